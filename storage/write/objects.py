"""A run file's attributes and datasets made through h5py's low-level calls, with the HDF5 datatypes, dataspaces
and dataset-creation property lists they need built once per writer rather than once per object.

Why: a prefill capture makes one file per batch row of every forward, each with ~15 attributes and ~7 datasets,
and h5py's high-level calls rebuild the same datatypes, dataspaces and property lists in Python every time: about
two thirds of an attribute's cost and half of a small dataset's. The objects are the ones h5py's high-level calls
make (same datatypes, dataspaces, chunks, filters, fill values, no timestamps; the tests compare the files'
``h5dump`` output), so readers see no difference. What is not plain (compressed datasets, object or array-typed
attribute values) goes through h5py's high-level calls as before.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5g, h5p, h5s, h5t

_TYPES: dict[tuple[str, str, bool], h5t.TypeID] = {}  # (dtype, its h5py metadata, logical) -> HDF5 type
_SPACES: dict[tuple[int, ...], h5s.SpaceID] = {}  # attribute shape -> dataspace (h5a.create copies it)
_GCPL: h5p.PropGCID | None = None  # group creation: no timestamps, as h5py makes groups


def _type(dtype: np.dtype, logical: bool = True) -> h5t.TypeID:
    """h5py's HDF5 type for ``dtype`` (text's UTF-8 marking is in the dtype's metadata, hence in the key)."""
    key = (dtype.str, repr(dtype.metadata), logical)
    found = _TYPES.get(key)
    if found is None:
        found = _TYPES[key] = h5t.py_create(dtype, logical=logical)
    return found


def _space(shape: tuple[int, ...]) -> h5s.SpaceID:
    found = _SPACES.get(shape)
    if found is None:
        found = _SPACES[shape] = h5s.create_simple(shape)
    return found


def write_attrs(obj: h5py.HLObject, values: dict[str, Any]) -> None:
    """Set attributes of ``obj`` as ``obj.attrs[name] = value`` does (an existing one is replaced), for values
    :func:`schema.attrs_to_store` made: numbers, bools, text arrays."""
    oid = obj.id
    for name, value in values.items():
        data = np.asarray(value, order="C")  # bytes and str: h5py makes them variable-length strings
        kind_ok = data.dtype.kind in "biufS" and data.dtype.subdtype is None and not isinstance(value, (bytes, str))
        if not (kind_ok and _plain(name)):
            obj.attrs[name] = value
            continue
        key = name.encode("ascii")
        if h5a.exists(oid, key):
            h5a.delete(oid, key)
        attr = h5a.create(oid, key, _type(data.dtype), _space(data.shape))
        try:
            attr.write(data, mtype=_type(data.dtype, logical=False))
        finally:
            attr.close()


def create_group(parent: h5py.Group, name: str) -> h5py.Group:
    """As ``parent.create_group(name)``."""
    if not _plain(name):
        return parent.create_group(name)
    global _GCPL
    if _GCPL is None:
        _GCPL = h5p.create(h5p.GROUP_CREATE)
        _GCPL.set_obj_track_times(False)  # h5py's default: no timestamps (files differ only in what they hold)
    return h5py.Group(h5g.create(parent.id, name.encode("ascii"), gcpl=_GCPL))


def _plain(name: str) -> bool:
    """A name h5py would store as it is, as an ASCII link or attribute name (others take h5py's own calls)."""
    return name.isascii() and "/" not in name and name not in ("", ".")


class DatasetMaker:
    """Creates chunked datasets; one per writer, holding a creation property list per kind of dataset."""

    def __init__(self) -> None:
        self._dcpls: dict[tuple, h5p.PropDCID] = {}

    def create(
        self,
        parent: h5py.Group,
        name: str,
        *,
        dtype: np.dtype,
        chunks: tuple[int, ...],
        maxshape: tuple[int | None, ...],
        shape: tuple[int, ...] | None = None,
        data: np.ndarray | None = None,
        fletcher32: bool = True,
        fillvalue: Any = None,
    ) -> h5py.Dataset:
        """As ``parent.create_dataset(name, shape, dtype, data, chunks=, maxshape=, fletcher32=, fillvalue=)``
        (no compression), written with ``data`` when given."""
        dtype = np.dtype(dtype)
        if not _plain(name):
            return parent.create_dataset(
                name, shape, dtype, data, chunks=chunks, maxshape=maxshape, fletcher32=fletcher32, fillvalue=fillvalue
            )
        if data is not None:
            data = np.ascontiguousarray(data, dtype=dtype)
            shape = data.shape
        assert shape is not None
        fill = None if fillvalue is None else np.array(fillvalue)
        key = (dtype.str, chunks, fletcher32, None if fill is None else (fill.dtype.str, fill.tobytes()))
        dcpl = self._dcpls.get(key)
        if dcpl is None:
            dcpl = self._dcpls[key] = h5p.create(h5p.DATASET_CREATE)
            dcpl.set_chunk(chunks)
            if fletcher32:
                dcpl.set_fletcher32()
            if fill is not None:
                dcpl.set_fill_value(fill)
            dcpl.set_obj_track_times(False)
        space = h5s.create_simple(shape, tuple(h5s.UNLIMITED if m is None else m for m in maxshape))
        dsid = h5d.create(parent.id, name.encode("ascii"), _type(dtype), space, dcpl=dcpl)
        if data is not None:
            dsid.write(h5s.ALL, h5s.ALL, data)
        return h5py.Dataset(dsid)
