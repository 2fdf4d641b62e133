"""glibc allocator settings for the command line (no-ops elsewhere).

bounded(): glibc raises its mmap threshold as large blocks are freed, after which the multi-MB
blocks that slicing and ranking churn through are carved from the heap and kept; a fixed 1 MB
threshold returns them to the system at once, so peak memory tracks what is live.

roomy(): calibration allocates and frees the same few activation-sized tensors (up to about
16 MB) thousands of times; as fresh mappings each costs page faults and zeroing (a third of a
SmolLM2 calibration's time went to the kernel). Inside roomy() they come from the heap and are
reused; the live set is bounded by the micro-batch size, so the heap is too.
"""

from __future__ import annotations

import contextlib

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
BOUNDED_MMAP = 1 << 20
_state = {"libc": None}


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except (OSError, AttributeError):
        return None


def bounded() -> None:
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(M_MMAP_THRESHOLD, BOUNDED_MMAP)  # a fixed value also stops the dynamic raise
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)
    except AttributeError:
        return
    _state["libc"] = libc


@contextlib.contextmanager
def roomy(mmap_threshold: int = 64 << 20):
    """Within the block, blocks under mmap_threshold come from the heap (only where bounded()
    is in force; the heap is trimmed back when the block ends)."""
    libc = _state["libc"]
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, BOUNDED_MMAP)
        with contextlib.suppress(AttributeError):
            libc.malloc_trim(0)
