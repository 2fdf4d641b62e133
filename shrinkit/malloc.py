"""glibc allocator settings for the command line (a no-op elsewhere).

bounded(): glibc raises its mmap threshold as large blocks are freed, after which the multi-MB
blocks that slicing and ranking churn through are carved from the heap and kept; a fixed 1 MB
threshold returns them to the system at once, so peak memory tracks what is live.

Activations of calibration are churned the same way (about 11 million minor page faults,
22 s of kernel time in a 45 s SmolLM2-135M calibration). Serving them from the heap instead
(a 64 MB threshold during calibration) cut that to 35 s, but heap fragmentation raised peak
memory by 40-220 MB, unpredictably; bounded, flat memory was kept.
"""

from __future__ import annotations

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def bounded() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)  # a fixed value also stops the dynamic raise
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):
        pass
