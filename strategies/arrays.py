"""Flower ``Array`` <-> NumPy with fewer copies than ``Array.numpy()`` / ``Array(ndarray)``.

An ``Array`` holds its values as ``.npy`` bytes. Flower decodes them with ``np.load`` and
encodes with ``np.save``, each a full copy (two to three for ``np.save`` into a growing
buffer). A 16 MB model crosses that boundary about 40 times a round in a simulation, and
every fresh 16 MB buffer also costs page faults. :func:`array_view` reads the ``.npy``
header and returns a read-only view of the bytes (no copy); :func:`to_array` writes the
header and the values in one copy. Both produce and accept what ``np.save`` / ``np.load``
do, so either side may use Flower's own methods.

:class:`StoredArray` is an ``Array`` that holds read-only NumPy values (for instance in
Ray's shared memory, see :mod:`strategies.ray_transport`) and makes its ``.npy`` bytes only
if something reads ``data``; :func:`array_view` returns its values as they are.
"""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr.app.message.array.SType.NUMPY
_FIELDS = ("dtype", "shape", "stype", "data")
_LENT = threading.local()


@contextmanager
def lend_values() -> Iterator[None]:
    """Within this block, on this thread, :meth:`StoredArray.numpy` returns the read-only
    values themselves instead of a writable copy.

    For code known only to read what ``numpy()`` returns, such as Flower's FedAvg
    aggregation (``value.numpy() * weight``), where copying every update is pure cost. A
    NumPy write into a lent array raises ``ValueError``.
    """
    before = getattr(_LENT, "on", False)
    _LENT.on = True
    try:
        yield
    finally:
        _LENT.on = before


class StoredArray(Array):
    """An ``Array`` of read-only NumPy ``values`` whose ``.npy`` bytes are made on demand.

    It is an ordinary ``Array`` to everything that uses one: ``data`` is the ``.npy`` bytes
    (made, once, when first read), ``numpy()`` returns a writable copy (the values
    themselves inside :func:`lend_values`), equality compares
    the fields, and it pickles, copies and deflates (Flower's wire form) as a plain
    ``Array``. What it saves is the bytes: a reader that wants only the values
    (:func:`array_view`, ``numpy()``) copies them at most once. Setting a field makes it a
    plain ``Array`` from then on.
    """

    def __init__(self, values: np.ndarray) -> None:
        if not isinstance(values, np.ndarray) or values.dtype.hasobject:
            raise ValueError("StoredArray needs a NumPy array of numbers")
        if values.flags.writeable:  # the values are the record's: nobody may change them
            values = values.view()
            values.flags.writeable = False
        self.__dict__.update(dtype=str(values.dtype), shape=tuple(values.shape), stype=NUMPY_STYPE)
        self.__dict__["_values"] = values

    @property  # type: ignore[override]
    def data(self) -> bytes:
        data = self.__dict__.get("_data")
        if data is None:
            data = self.__dict__["_data"] = to_array(self.__dict__["_values"]).data
        return data

    @data.setter
    def data(self, value: bytes) -> None:
        self.__dict__["_data"] = value

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FIELDS and "_values" in self.__dict__:
            _ = self.data  # the bytes now carry the values; the fields may change freely
            del self.__dict__["_values"]
        super().__setattr__(name, value)

    def values(self) -> np.ndarray | None:
        """The read-only values, or None once a field was set."""
        return self.__dict__.get("_values")

    def numpy(self) -> np.ndarray:
        values = self.values()
        if values is None:
            return super().numpy()
        return values if getattr(_LENT, "on", False) else values.copy()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Array):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # type: ignore[assignment]  # as Array's: mutable, compared by value

    def __reduce__(self) -> tuple[type[Array], tuple[str, tuple[int, ...], str, bytes]]:
        return Array, (self.dtype, self.shape, self.stype, self.data)

    def deflate(self) -> bytes:
        # Flower's serialised form names the class, and its readers know only ``Array``.
        return Array(self.dtype, self.shape, self.stype, self.data).deflate()


def serialised_size(array: Array) -> int:
    """Bytes of ``array.data``, without making them for a :class:`StoredArray`."""
    if isinstance(array, StoredArray) and (values := array.values()) is not None:
        return len(_npy_header(values)) + values.nbytes
    return len(array.data)


def array_view(array: Array) -> np.ndarray:
    """The values of ``array`` as a read-only NumPy view of its bytes (no copy).

    Raises ValueError for a malformed ``.npy`` payload (bad header, object dtype, too few
    bytes); other serialisation types fall back to ``Array.numpy()``.
    """
    if isinstance(array, StoredArray) and (values := array.values()) is not None:
        return values
    if array.stype != NUMPY_STYPE:
        return array.numpy()
    data = array.data
    header = io.BytesIO(data[:65536])  # .npy headers are far shorter; no copy of the values
    version = np.lib.format.read_magic(header)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(header)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(header)
    else:
        raise ValueError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    count = math.prod(shape)
    values = np.frombuffer(data, dtype=dtype, count=count, offset=header.tell())
    return values.reshape(shape[::-1]).T if fortran else values.reshape(shape)


def arrays_view(record: ArrayRecord) -> dict[str, np.ndarray]:
    """:func:`array_view` of every array of ``record``, by name."""
    return {name: array_view(a) for name, a in record.items()}


def _npy_header(values: np.ndarray) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    return header.getvalue()


def to_array(values: np.ndarray) -> Array:
    """An ``Array`` of ``values`` in ``.npy`` format, copying the values once."""
    values = np.asarray(values)
    if not values.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
        values = values.copy(order="C")
    if values.dtype.hasobject:
        raise ValueError("object arrays cannot be sent")
    data = b"".join((_npy_header(values), values.reshape(-1).view(np.uint8)))
    return Array(str(values.dtype), tuple(values.shape), NUMPY_STYPE, data)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays`` (in their order), each by :func:`to_array`."""
    return ArrayRecord({name: to_array(np.asarray(a)) for name, a in arrays.items()})
