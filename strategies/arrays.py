"""Flower ``Array`` <-> NumPy with fewer copies than ``Array.numpy()`` / ``Array(ndarray)``.

An ``Array`` holds its values as ``.npy`` bytes. Flower decodes them with ``np.load`` and
encodes with ``np.save``, each a full copy (two to three for ``np.save`` into a growing
buffer). A 16 MB model crosses that boundary about 40 times a round in a simulation, and
every fresh 16 MB buffer also costs page faults. :func:`array_view` reads the ``.npy``
header and returns a read-only view of the bytes (no copy); :func:`to_array` writes the
header and the values in one copy. Both produce and accept what ``np.save`` / ``np.load``
do, so either side may use Flower's own methods.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

_NUMPY_STYPE = "numpy.ndarray"  # flwr.app.message.array.SType.NUMPY


def array_view(array: Array) -> np.ndarray:
    """The values of ``array`` as a read-only NumPy view of its bytes (no copy).

    Raises ValueError for a malformed ``.npy`` payload (bad header, object dtype, too few
    bytes); other serialisation types fall back to ``Array.numpy()``.
    """
    if array.stype != _NUMPY_STYPE:
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


def to_array(values: np.ndarray) -> Array:
    """An ``Array`` of ``values`` in ``.npy`` format, copying the values once."""
    values = np.asarray(values)
    if not values.flags.c_contiguous:  # (np.ascontiguousarray would make 0-d arrays 1-d)
        values = values.copy(order="C")
    if values.dtype.hasobject:
        raise ValueError("object arrays cannot be sent")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join((header.getvalue(), values.reshape(-1).view(np.uint8)))
    return Array(str(values.dtype), tuple(values.shape), _NUMPY_STYPE, data)


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ``ArrayRecord`` of ``arrays`` (in their order), each by :func:`to_array`."""
    return ArrayRecord({name: to_array(np.asarray(a)) for name, a in arrays.items()})
