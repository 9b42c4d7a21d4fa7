"""strategies.arrays: Flower Array <-> NumPy without Flower's extra copies."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from precode_flower.strategies.arrays import (
    StoredArray,
    array_view,
    arrays_view,
    lend_values,
    serialised_size,
    to_array,
    to_array_record,
)

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


@pytest.mark.parametrize("values", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_stored_array_is_the_same_array_as_an_encoded_one(values: np.ndarray) -> None:
    stored, plain = StoredArray(values), to_array(values)
    assert serialised_size(stored) == len(plain.data)
    assert "_data" not in stored.__dict__  # no bytes made for the size
    assert stored == plain and plain == stored
    assert stored.data == plain.data
    for decoded in (stored.numpy(), array_view(stored), Array.numpy(stored)):
        assert decoded.dtype == values.dtype and decoded.shape == values.shape
        np.testing.assert_array_equal(decoded, values)
    # Flower's wire form (deflate) and object ids are a plain Array's
    assert _record(x=plain).object_id == _record(x=stored).object_id
    for clone in (pickle.loads(pickle.dumps(stored)), copy.deepcopy(stored)):
        assert type(clone) is Array and clone == plain


def _record(**arrays: Array) -> ArrayRecord:
    record = ArrayRecord()
    for name, a in arrays.items():
        record[name] = a
    return record


def test_stored_array_views_its_values_and_nobody_can_change_them() -> None:
    values = np.arange(6, dtype=np.float32)
    stored = StoredArray(values)
    view = array_view(stored)
    assert np.shares_memory(view, values) and not view.flags.writeable
    copied = stored.numpy()  # Flower's numpy() gives an array of the caller's own
    assert copied.flags.writeable and not np.shares_memory(copied, values)
    copied[0] = 99
    assert array_view(stored)[0] == 0
    assert values.flags.writeable  # the caller's array itself is left as it was


def test_lent_values_are_the_stored_ones_only_inside_the_block_and_thread() -> None:
    values = np.arange(6, dtype=np.float32)
    stored = StoredArray(values)
    seen: list[np.ndarray] = []
    with lend_values():
        lent = stored.numpy()
        other = threading.Thread(target=lambda: seen.append(stored.numpy()))
        other.start()
        other.join()
        with lend_values():  # nested: lent inside, and still lent after the inner block
            assert stored.numpy() is lent
        assert stored.numpy() is lent
    assert np.shares_memory(lent, values) and not lent.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        lent[0] = 99
    assert not np.shares_memory(seen[0], values)  # another thread got its own copy
    after = stored.numpy()
    assert after.flags.writeable and not np.shares_memory(after, values)
    plain = Array(values)
    with lend_values():  # an ordinary Array decodes its bytes as ever
        assert plain.numpy().flags.writeable


def test_setting_a_field_makes_a_stored_array_plain() -> None:
    stored = StoredArray(np.arange(4, dtype=np.float32))
    stored.shape = (2, 2)  # Flower's fields are plain attributes: the bytes now carry it
    assert stored.values() is None
    assert stored == Array(
        "float32", (2, 2), "numpy.ndarray", to_array(np.arange(4.0, dtype=np.float32)).data
    )
    np.testing.assert_array_equal(array_view(stored), np.arange(4, dtype=np.float32))
    stored.data = to_array(np.zeros(4, np.float32)).data
    np.testing.assert_array_equal(stored.numpy(), np.zeros(4))


def test_stored_array_refuses_what_is_not_numbers() -> None:
    with pytest.raises(ValueError, match="NumPy array of numbers"):
        StoredArray(np.array([object()]))
    with pytest.raises(ValueError, match="NumPy array of numbers"):
        StoredArray([1.0, 2.0])  # type: ignore[arg-type]
