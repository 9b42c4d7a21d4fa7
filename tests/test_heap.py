"""precode_flower.heap: the trim happens only when enough of the heap is free."""

from __future__ import annotations

import numpy as np
import pytest

from precode_flower import heap


class _FakeLibc:
    def __init__(self, free: int) -> None:
        self.free, self.trims = free, 0

    def mallinfo2(self):  # noqa: ANN201 - the ctypes struct's stand-in
        return type("MallInfo2", (), {"fordblks": self.free})()

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.mark.parametrize(("free", "min_free", "trims"), [(10, 64, 0), (64, 64, 1), (0, 0, 1)])
def test_trim_only_when_enough_is_free(monkeypatch, free, min_free, trims) -> None:
    libc = _FakeLibc(free)
    monkeypatch.setattr(heap, "_LIBC", libc)
    heap.release_freed_memory(min_free=min_free)
    assert libc.trims == trims


def test_free_heap_bytes_sees_freed_blocks() -> None:
    if heap.free_heap_bytes() is None:
        pytest.skip("not glibc >= 2.33")
    # Mid-sized blocks (below the mmap threshold) live in the heap and stay there when freed.
    blocks = [np.ones(8 << 10) for _ in range(256)]  # 256 x 64 KiB
    in_use = heap.free_heap_bytes()
    del blocks[:-1]  # the last one keeps the heap's top in use, so nothing is trimmed
    assert heap.free_heap_bytes() >= in_use + (8 << 20)
