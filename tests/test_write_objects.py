"""The writer makes run files' attributes, groups and datasets through h5py's low-level calls: the files must be the
ones h5py's high-level calls make, byte for byte."""

from __future__ import annotations

import h5py
import numpy as np

from loopscope.storage import run_files, schema
from loopscope.storage.write.objects import DatasetMaker, create_group, write_attrs

ATTRS = {
    "format": schema.text("loopscope-run"),
    "format_version": 1,
    "complete": False,
    "call": schema.text("générer"),  # UTF-8 text
    "empty": schema.text(""),
    "eps": 1e-5,
    "rows": np.int32(3),
    "loops_json": schema.text('["core"]'),
    "shape": np.array([2, 3], dtype=np.int64),
    "raw": b"bytes",  # h5py's own call: a variable-length string
    "ascii": np.array(b"fixed"),
}
STATES = {"shape": (5, 3, 8), "maxshape": (None, None, 8), "chunks": (4, 2, 8)}  # a loop's states, as the writer's


def _high_level(f: h5py.File) -> None:
    f.attrs.update(ATTRS)
    f.attrs["complete"] = True  # replaced, as at a run's close
    loops = f.create_group("loops")
    core = loops.create_group("core")
    ids = np.arange(7, dtype=np.int64)
    f.create_dataset("token_ids", data=ids, maxshape=(None,), chunks=(1024,), fletcher32=True)
    f.create_dataset("later", shape=(0,), dtype=np.int32, maxshape=(None,), chunks=(1024,), fletcher32=True)
    f.create_dataset("plain", data=ids.astype(np.int8), maxshape=(None,), chunks=(16,), fletcher32=False)
    states = core.create_dataset("states", **STATES, dtype=np.float32, fillvalue=np.nan, fletcher32=True)
    states.attrs["logical_dtype"] = schema.text("float32")
    core.create_dataset("bf16", **STATES, dtype=np.uint16, fillvalue=schema.BF16_NAN_BITS, fletcher32=True)
    core.create_dataset("num_steps", data=np.zeros(5, np.int32), chunks=(5,), maxshape=(5,), fletcher32=True)


def _low_level(f: h5py.File) -> None:
    write_attrs(f, ATTRS)
    write_attrs(f, {"complete": True})
    make = DatasetMaker()
    loops = create_group(f, "loops")
    core = create_group(loops, "core")
    ids = np.arange(7, dtype=np.int64)
    make.create(f, "token_ids", dtype=ids.dtype, data=ids, maxshape=(None,), chunks=(1024,))
    make.create(f, "later", shape=(0,), dtype=np.dtype(np.int32), maxshape=(None,), chunks=(1024,))
    make.create(f, "plain", dtype=np.dtype(np.int8), data=ids, maxshape=(None,), chunks=(16,), fletcher32=False)
    states = make.create(core, "states", **STATES, dtype=np.dtype(np.float32), fillvalue=np.nan)
    write_attrs(states, {"logical_dtype": schema.text("float32")})
    make.create(core, "bf16", **STATES, dtype=np.dtype(np.uint16), fillvalue=schema.BF16_NAN_BITS)
    zeros = np.zeros(5, np.int32)
    make.create(core, "num_steps", dtype=zeros.dtype, data=zeros, chunks=(5,), maxshape=(5,))


def test_low_level_objects_are_h5pys_byte_for_byte(tmp_path):
    paths = []
    for name, build in (("high", _high_level), ("low", _low_level)):
        path = tmp_path / f"{name}.h5"
        with h5py.File(path, "w", **run_files.h5_kwargs(None, 0)) as f:
            build(f)
        paths.append(path)
    high, low = (p.read_bytes() for p in paths)
    assert high == low
    with h5py.File(paths[1], "r") as f:
        assert f.attrs["complete"] and schema.as_text(f.attrs["call"]) == "générer"
        assert np.isnan(f["loops/core/states"][0, 0, 0]) and f["loops/core/bf16"][0, 0, 0] == schema.BF16_NAN_BITS
        assert list(f["token_ids"][:]) == list(range(7)) and f["loops/core/states"].fletcher32
