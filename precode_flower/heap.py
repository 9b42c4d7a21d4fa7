"""glibc heap controls for long-running processes that pass large buffers around.

Model-sized buffers (messages, decoded arrays) are allocated and freed every round. glibc
raises its mmap threshold after such frees, so later ones land on the heap, and freed heap
pages stay resident until trimmed. Both functions are no-ops where libc is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_M_ARENA_MAX = -8  # mallopt parameter, <malloc.h>


def _load_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


_LIBC = _load_libc()


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (``malloc_trim(0)``)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_malloc_arenas(arenas: int) -> None:
    """``MALLOC_ARENA_MAX`` for this already running process (the environment variable
    only applies to processes started after it is set)."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, int(arenas))
