"""Process-wide runtime settings that shrinkit's memory and speed measurements rely on.

bounded(): glibc raises its mmap threshold as large blocks are freed, after which the multi-MB
blocks that slicing and ranking churn through are carved from the heap and kept; a fixed 1 MB
threshold returns them to the system at once, so peak memory tracks what is live.

Activations of calibration are churned the same way (about 11 million minor page faults,
22 s of kernel time in a 45 s SmolLM2-135M calibration). Serving them from the heap instead
(a 64 MB threshold during calibration) cut that to 35 s, but heap fragmentation raised peak
memory by 40-220 MB, unpredictably; bounded, flat memory was kept.

trim(): blocks under the threshold (slicing's row blocks, small tensors) come from the heap,
and long-lived ones among them leave free holes that the heap's top-only trimming cannot give
back; heal, which loads and frees a child block per kept layer, grew by 3-4 MB of such holes per
layer (22 MB over 8 layers at the 1.7 GB preset). trim() returns every free page of the heap
(glibc's malloc_trim), once per layer.

gomp_default(): idle OpenMP workers spin for 300,000 iterations by default, taking the two
cores of a small machine from shrinkit's own writer and sha256 threads (measured on a 4 GB
parent with hashing: 6.2-7.5 s by default, 5.1-5.9 s with 10,000). libgomp reads
GOMP_SPINCOUNT once, when torch loads it, so `import shrinkit` sets it (unless the user did)
only while torch is not yet imported.

Both are applied by the command line and by the Python API (the first call); both are
harmless elsewhere: bounded() is a no-op off glibc, and SHRINKIT_NO_MALLOC_TUNING=1 (or a user's
own GOMP_SPINCOUNT) keeps the process's settings.
"""

from __future__ import annotations

import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_applied = False


def bounded() -> None:
    """Fixed glibc mmap (1 MB) and trim (8 MB) thresholds; once per process; idempotent."""
    global _applied
    if _applied or os.environ.get("SHRINKIT_NO_MALLOC_TUNING"):
        return
    _applied = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)  # a fixed value also stops the dynamic raise
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):
        pass


def trim() -> None:
    """Give the heap's free pages back to the system (glibc malloc_trim); a no-op elsewhere or
    with SHRINKIT_NO_MALLOC_TUNING=1."""
    global _libc
    if _libc is False or os.environ.get("SHRINKIT_NO_MALLOC_TUNING"):
        return
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        _libc = False


_libc = None


def gomp_default() -> None:
    if "torch" not in sys.modules and not os.environ.get("SHRINKIT_NO_MALLOC_TUNING"):
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
