"""glibc heap controls for long-running processes that pass large buffers around.

Model-sized buffers (messages, decoded arrays) are allocated and freed every round. glibc
raises its mmap threshold after such frees, so later ones land on the heap, and freed heap
pages stay resident until trimmed; but trimmed pages cost page faults when they are used
again. The glibc functions are no-ops where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_M_ARENA_MAX = -8  # mallopt parameter, <malloc.h>
#: Free heap bytes above which the per-message trim of a client actor gives memory back.
TRIM_MIN_FREE = 64 << 20


class _MallInfo2(ctypes.Structure):  # struct mallinfo2, <malloc.h> (glibc >= 2.33)
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()
if _LIBC is not None and hasattr(_LIBC, "mallinfo2"):
    _LIBC.mallinfo2.restype = _MallInfo2


def free_heap_bytes() -> int | None:
    """Bytes free inside the malloc heap (``mallinfo2().fordblks``); None if unknown."""
    if _LIBC is None or not hasattr(_LIBC, "mallinfo2"):
        return None
    return int(_LIBC.mallinfo2().fordblks)


def release_freed_memory(min_free: int = 0) -> None:
    """Return the heap's free pages to the OS (``malloc_trim(0)``), if at least
    ``min_free`` bytes are free (always where that is unknown)."""
    if _LIBC is None:
        return
    if min_free > 0 and (free := free_heap_bytes()) is not None and free < min_free:
        return
    _LIBC.malloc_trim(0)


def limit_malloc_arenas(arenas: int) -> None:
    """``MALLOC_ARENA_MAX`` for this already running process (the environment variable
    only applies to processes started after it is set)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, int(arenas))
