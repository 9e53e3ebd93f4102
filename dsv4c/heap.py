"""Giving freed heap memory back to the system between large pieces of work (no torch here: the pipeline runner
imports it)."""

from __future__ import annotations


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc's malloc_trim; a no-op elsewhere). malloc serves
    tensors under its adaptive mmap threshold (up to 32 MiB) from the heap, which keeps what they free: measured on
    an 8-layer model, the streamed reference held 530 MB more than its working set after one validation."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
