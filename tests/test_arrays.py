"""strategies.arrays: Flower Array <-> NumPy without Flower's extra copies."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from strategies.arrays import array_view, arrays_view, to_array, to_array_record

CASES = [
    np.asarray(np.float32(3.0)),  # 0-d
    np.zeros((0, 3), np.float32),  # empty
    np.arange(12, dtype=np.float16).reshape(3, 4),
    np.array([True, False]),
    np.arange(5, dtype=np.int64),
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    np.arange(12.0).reshape(3, 4)[:, ::2],  # not contiguous
]


@pytest.mark.parametrize("values", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_round_trip_agrees_with_flower(values: np.ndarray) -> None:
    ours, flowers = to_array(values), Array(values)
    assert (ours.dtype, ours.shape, ours.stype) == (flowers.dtype, flowers.shape, flowers.stype)
    for decoded in (ours.numpy(), array_view(ours), array_view(flowers)):
        assert decoded.dtype == values.dtype and decoded.shape == values.shape
        np.testing.assert_array_equal(decoded, values)


def test_view_shares_the_message_bytes() -> None:
    array = to_array(np.arange(1000, dtype=np.float32))
    view = array_view(array)
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(array.data, dtype=np.uint8))


def test_record_helpers_keep_names_and_order() -> None:
    arrays = {"b": np.ones(3, np.float32), "a": np.zeros((2, 2), np.int64)}
    record = to_array_record(arrays)
    assert isinstance(record, ArrayRecord) and list(record) == ["b", "a"]
    views = arrays_view(record)
    assert list(views) == ["b", "a"]
    np.testing.assert_array_equal(views["a"], arrays["a"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not an npy payload", "magic"),
        (None, "buffer is smaller"),  # a truncated payload: header of 4 floats, 3 sent
    ],
)
def test_malformed_payload_raises_value_error(data: bytes | None, match: str) -> None:
    if data is None:
        data = to_array(np.zeros(4, np.float32)).data[:-4]
    with pytest.raises(ValueError, match=match):
        array_view(Array("float32", (4,), "numpy.ndarray", data))


def test_object_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="object"):
        to_array(np.array([object()]))
