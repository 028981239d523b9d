"""Export a capture to NumPy ``.npz`` or ``safetensors``, for tools that do not read HDF5.

Both writers stream: each array is written a block of tokens at a time, so exporting a capture larger than memory
works. (``numpy.savez`` and ``safetensors.save_file`` both need every array in memory first; the safetensors
layout — an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, then the raw bytes — is simple
enough to write incrementally, and files are checked with the safetensors library in the tests.)

Names follow the HDF5 layout: ``runs/000000/token_ids``, ``runs/000000/loops/core/states``,
``runs/000000/loops/core/num_steps`` (iterations run, as recorded), ``.../signals/exit_value``, ... With a step
stride, ``.../step_iterations`` [T, K] says which iteration each stored step holds. Token strings, each run's
attributes (its ``step_stride``, ``call``, ...) and the capture header go to ``meta`` (a JSON string: an array in
the npz, ``__metadata__`` in safetensors).
bfloat16 states stay bfloat16 in safetensors and are widened to float32 (exactly) in npz, which has no bf16.
"""

from __future__ import annotations

import functools
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import LoopscopeError
from . import dependencies, outputs, schema
from .reader import CaptureFile, Run

FORMATS = ("npz", "safetensors")
BLOCK_BYTES = 32 << 20
_SAFETENSORS_DTYPES = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.uint16): "U16",
}


@dataclass
class _Array:
    """One exported array: its name, dtype and shape up front, and its bytes as a stream of row blocks."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]
    safetensors_dtype: str | None = None  # overrides the dtype's code (BF16 kept as its bits)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def export(
    capture: CaptureFile,
    out: str | os.PathLike,
    fmt: str,
    *,
    runs: list[int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Write ``runs`` (default: all complete runs) of ``capture`` to ``out`` in ``fmt``; returns the array names.

    ``progress`` is called with the bytes written after each block.
    """
    if fmt not in FORMATS:
        raise LoopscopeError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    check_out(capture, out)
    suffix = os.path.splitext(os.fspath(out))[1].lower()
    if suffix != "." + fmt:  # a reader picks its loader by the name: an .npz named .safetensors fails there
        raise LoopscopeError(f"--out {out}: a {fmt} file is named *.{fmt}; choose another --out or --format")
    chosen = capture.runs if runs is None else unique_runs([capture.run(i) for i in runs])
    if not chosen:
        raise LoopscopeError(f"{capture.path} has no complete runs to export")
    arrays = [a for run in chosen for a in _run_arrays(run, widen_bf16=(fmt == "npz"))]
    meta = json.dumps(
        {
            "capture": {k: v for k, v in capture.meta.items() if isinstance(v, (str, int, float, bool, dict, list))},
            "tokens": {schema.run_name(run.index): run.tokens for run in chosen},
            "runs": {schema.run_name(run.index): _json_safe(run.attrs) for run in chosen},
        }
    )
    parent = os.path.dirname(os.fspath(out)) or "."
    if not os.path.isdir(parent):
        raise LoopscopeError(f"{out}: directory {parent} does not exist; create it first")
    writer = _write_npz if fmt == "npz" else _write_safetensors
    # beside ``out`` and renamed once whole: a failure leaves no half file, and ``out`` as it was
    outputs.write_whole(out, lambda partial: writer(partial, arrays, meta, progress or (lambda n: None)))
    return [a.name for a in arrays]


def unique_runs(runs: list[Run]) -> list[Run]:
    """``runs`` without repeats (``--run 0 --run -3`` of three runs name one run twice), the first kept: a run
    exported twice gives every array name twice, which no safetensors reader loads."""
    first: dict[int, Run] = {}
    for run in runs:
        first.setdefault(run.index, run)
    return list(first.values())


def check_out(capture: CaptureFile, out: str | os.PathLike) -> None:
    """Refuse an ``out`` that the capture reads: the export streams from those files while it writes, so it would
    destroy the data it is exporting."""
    dependencies.refuse_outputs(capture, [out], "the export must not write where it reads")


def _run_arrays(run: Run, widen_bf16: bool) -> list[_Array]:
    prefix = f"runs/{run.name}"
    arrays = []
    small = {key: getattr(run, key) for key in ("token_ids", "attention_mask", "positions", "forward_index")}
    for loop in run.loops:
        small[f"loops/{loop}/num_steps"] = run.iterations_of(loop)  # as stored: iterations, not stored steps
        if run.step_stride > 1:
            small[f"loops/{loop}/step_iterations"] = run.step_iterations(loop)
        labels = run.step_labels(loop)
        if labels is not None:
            small[f"loops/{loop}/step_labels"] = labels
        for signal in run.signal_names(loop):
            small[f"loops/{loop}/signals/{signal}"] = run.signal(signal, loop)
    for key, data in small.items():
        arrays.append(_Array(f"{prefix}/{key}", data.dtype, data.shape, functools.partial(iter, [data])))
    for loop in run.loops:
        arrays.append(_states_array(run, loop, f"{prefix}/loops/{loop}/states", widen_bf16))
    return arrays


def _json_safe(attrs: dict) -> dict:
    """Run attributes that JSON can hold (numbers, text, flags); arrays as lists, their bytes as text (UTF-8,
    undecodable bytes replaced). An attribute JSON cannot hold (a compound or complex value) is left out."""
    out = {}
    for key, value in attrs.items():
        value = _json_value(value)
        if value is not _LEFT_OUT:
            out[key] = value
    return out


_LEFT_OUT = object()


def _json_value(value):
    """``value`` as JSON can hold it (text, a number, a flag, nested lists of them), or ``_LEFT_OUT``."""
    text = schema.as_text(value)
    if text is not None:
        return text
    if isinstance(value, (np.ndarray, np.generic)):
        value = value.tolist()  # nested lists of Python values (bytes stay bytes: decoded below)
    if isinstance(value, (list, tuple)):
        items = [_json_value(item) for item in value]
        return _LEFT_OUT if any(item is _LEFT_OUT for item in items) else items
    return value if isinstance(value, (str, int, float, bool)) else _LEFT_OUT


def _states_array(run: Run, loop: str, name: str, widen_bf16: bool) -> _Array:
    ds = run.dataset(loop)  # not kept: the run's file may be closed (and opened again) before its blocks are read
    bf16 = run.logical_dtype(loop) == "bfloat16"
    dtype = np.dtype(np.float32) if bf16 and widen_bf16 else ds.dtype
    shape = ds.shape
    row_bytes = max(int(np.prod(shape[1:], dtype=np.int64)) * 4, 1)
    step = max(BLOCK_BYTES // row_bytes, 1)

    def blocks():
        for t0 in range(0, shape[0], step):
            block = run.read(np.s_[t0 : t0 + step], loop)
            yield run.decode(block, loop) if bf16 and widen_bf16 else block

    return _Array(name, dtype, shape, blocks, "BF16" if bf16 and not widen_bf16 else None)


def _write_npz(path: str, arrays: list[_Array], meta: str, progress) -> None:
    for array in arrays:  # before the file is made: numpy writes an object array as pointers, no reader loads it
        if array.dtype.hasobject:
            raise LoopscopeError(f"cannot export {array.name}: it holds Python objects, not numbers (damaged)")
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for array in arrays:
            with archive.open(array.name + ".npy", "w", force_zip64=True) as handle:
                header = {
                    "descr": np.lib.format.dtype_to_descr(array.dtype),
                    "fortran_order": False,
                    "shape": array.shape,
                }
                np.lib.format.write_array_header_1_0(handle, header)
                for block in array.blocks():
                    handle.write(np.ascontiguousarray(block, dtype=array.dtype).tobytes())
                    progress(block.nbytes)
        with archive.open("meta.npy", "w") as handle:
            np.lib.format.write_array(handle, np.array(meta), allow_pickle=False)


def _write_safetensors(path: str, arrays: list[_Array], meta: str, progress) -> None:
    header: dict = {"__metadata__": {"loopscope": meta}}
    offset = 0
    for array in arrays:
        code = array.safetensors_dtype or _SAFETENSORS_DTYPES.get(array.dtype)
        if code is None:
            raise LoopscopeError(f"{array.name}: dtype {array.dtype} has no safetensors equivalent; export to npz")
        header[array.name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the byte buffer starts 8-byte aligned
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for array in arrays:
            for block in array.blocks():
                handle.write(np.ascontiguousarray(block, dtype=array.dtype.newbyteorder("<")).tobytes())
                progress(block.nbytes)
