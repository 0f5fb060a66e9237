"""The process's heap, for the stages that allocate and free tensors of many MB in every batch.

glibc's malloc gives each allocation above its mmap threshold (adaptive, at most 32 MiB) a mapping of its own,
unmapped again when it is freed, and hands the heap's freed top back to the OS at once; a stage that allocates an
attention tensor (B, H, T, T) per layer per batch then page-faults every one of them in anew. keep_freed_memory
serves such tensors from the heap and keeps freed pages for the next batch; release_freed_memory hands them back.
Both are no-ops, returning False, where the C library is not glibc (macOS, Windows).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
KEEP_BELOW_BYTES = 1 << 30  # allocations up to this size come from the heap; this much freed top stays


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Serve allocations up to KEEP_BELOW_BYTES from the heap and keep freed memory for reuse (mallopt's mmap and
    trim thresholds), for the rest of the process; the memory is handed back by release_freed_memory."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return all(libc.mallopt(param, KEEP_BELOW_BYTES) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD))


def release_freed_memory() -> bool:
    """Hand freed heap pages back to the OS (malloc_trim).

    Each batch frees tens of MB of attention tensors, while a parquet writer keeps small allocations (row group
    metadata) alive between them; the heap then cannot shrink at its top, and the process would grow with every
    batch written. Trimming every few batches keeps peak memory flat in the number of batches.
    """
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
