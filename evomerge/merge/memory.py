"""Keep freed tensor memory inside the process during a merge.

A merge allocates and frees tensors of the same few sizes thousands of times. glibc serves
blocks that large with mmap and returns them on free, so every new tensor pays page faults
on first touch: on a 58M-parameter merge that is over half of the CPU time. Telling glibc to
serve them from its heap and not to trim it makes freed blocks reusable as they are. Peak
memory is unchanged; memory is returned to the OS when the process exits.

Scoring is the opposite case: lm-eval allocates a batch's logits (batch x tokens x vocabulary)
of a different size every batch, and a heap that keeps every block cannot fit the next batch's
into the last one's: resident memory grew to about 4 copies of the logits where 3 are alive
(benchmarks/scoring_memory.py). While a candidate is scored, large blocks are mmapped again
(`scoring_allocations`), so they go back to the system as they are freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_GLIBC_MMAP_MAX = 65536  # glibc's default
_done = False


def keep_freed_memory() -> bool:
    """Switch glibc's allocator to heap-only, untrimmed mode (once; no-op off glibc/Linux)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _done


@contextlib.contextmanager
def scoring_allocations() -> Iterator[None]:
    """Large blocks mmapped (and returned when freed) inside the block, the merge's heap-only
    mode after it; nothing changes where keep_freed_memory has not switched it on."""
    if not _done:
        yield
        return
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        mallopt(_M_MMAP_MAX, 0)
