"""What a run file and the index's readout must look like before anything in them is read.

Every object is reached through a hard link (a soft or external link could open any file), every dataset read
whole is checked against the bytes it stores, and the shapes must agree with each other: token datasets all [T],
states [T, K, H] with H the readout's width, labels [K, D], signals [T, <=K]. A crafted file that declares more
than it holds is a one-line CaptureFileError here, not a MemoryError or an hour of reading fill later.
"""

from __future__ import annotations

import h5py
import numpy as np

from ..errors import CaptureFileError
from . import compression, safety, schema

TOKEN_DATASETS = ("token_ids", "attention_mask", "positions", "forward_index")
MAX_LOOPS = 64
MAX_SIGNALS = 256
MAX_LABEL_DEPTH = 16


def check_run(group: h5py.File, path: str, readout_width: int | None = None) -> dict:
    """Validate a run file's layout; returns its root attributes (read with bounded sizes)."""
    where = safety.clean(path)
    attrs = safety.read_attrs(group, path)
    if schema.as_text(attrs.get("format")) != schema.RUN_FORMAT_NAME:
        raise CaptureFileError(f"{where} is not a loopscope run file")
    _check_version(attrs.get("format_version"), where)
    data = {}
    for name in TOKEN_DATASETS:
        data[name] = safety.hard_child(group, name, path, h5py.Dataset)
        if data[name] is None:
            raise CaptureFileError(f"{where}: run file has no {name!r}; it is damaged (re-capture that run)")
    loops = safety.hard_child(group, schema.LOOPS, path)
    if loops is None:
        raise CaptureFileError(f"{where}: run file has no {schema.LOOPS!r}; it is damaged (re-capture that run)")
    if not isinstance(loops, h5py.Group):
        raise CaptureFileError(f"{where}: {schema.LOOPS!r} is not a group; damaged")
    n = data["token_ids"].shape
    if len(n) != 1 or n[0] > safety.MAX_TOKENS:
        raise CaptureFileError(f"{where}: token_ids has shape {n}; damaged")
    for name, ds in data.items():
        if ds.shape != n:
            raise CaptureFileError(f"{where}: {name} has shape {ds.shape}, token_ids {n}; damaged")
        if ds.dtype.kind not in "iu":
            raise CaptureFileError(f"{where}: {name} has dtype {ds.dtype}; damaged")
        safety.check_whole(ds, path)
    for name in ("token_bytes", "token_ends"):
        ds = safety.hard_child(group, name, path, h5py.Dataset)
        if ds is not None:
            if ds.ndim != 1 or ds.dtype.kind not in "iu" or (name == "token_ends" and ds.shape != n):
                raise CaptureFileError(f"{where}: {name} has shape {ds.shape}, dtype {ds.dtype}; damaged")
            safety.check_whole(ds, path)
    names = list(loops.keys())
    if len(names) > MAX_LOOPS:
        raise CaptureFileError(f"{where}: {len(names)} loops; damaged")
    for loop in names:
        _check_loop(loops, loop, n[0], path, readout_width)
    return attrs


def _check_version(value, where: str) -> None:
    """A run file's layout version, as the index's is checked: a newer layout may mean something else entirely."""
    try:
        version = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CaptureFileError(f"{where}: run format version {safety.clean(value)!r} is no number; damaged") from None
    if version > schema.FORMAT_VERSION:
        raise CaptureFileError(
            f"{where} has run format version {version}, newer than this loopscope reads ({schema.FORMAT_VERSION}); "
            "upgrade loopscope"
        )
    if version < 1:
        raise CaptureFileError(f"{where} has an invalid run format version {version}; damaged")


def _check_loop(loops: h5py.Group, loop: str, n_tokens: int, path: str, readout_width: int | None) -> None:
    where = safety.clean(path)
    sub = safety.hard_child(loops, loop, path)
    states = safety.hard_child(sub, "states", path) if isinstance(sub, h5py.Group) else None
    num_steps = safety.hard_child(sub, "num_steps", path) if isinstance(sub, h5py.Group) else None
    if not isinstance(states, h5py.Dataset) or not isinstance(num_steps, h5py.Dataset):
        raise CaptureFileError(f"{where}: loop {safety.clean(loop)!r} lacks states or num_steps; damaged")
    if states.ndim != 3 or states.shape[0] != n_tokens or states.dtype.kind not in "fu":
        raise CaptureFileError(
            f"{where}: the states of loop {safety.clean(loop)!r} have shape {states.shape}, dtype {states.dtype} "
            f"for {n_tokens} tokens; damaged"
        )
    safety.check_states(states, path)
    if readout_width is not None and states.shape[2] != readout_width:
        raise CaptureFileError(
            f"{where}: states of loop {safety.clean(loop)!r} have width {states.shape[2]}, the index's readout "
            f"{readout_width}; this run belongs to another model's capture, or is damaged"
        )
    if num_steps.shape != (n_tokens,):
        raise CaptureFileError(f"{where}: num_steps has shape {num_steps.shape} for {n_tokens} tokens; damaged")
    safety.check_whole(num_steps, path)
    labels = safety.hard_child(sub, "step_labels", path, h5py.Dataset)
    if labels is not None:
        if labels.ndim != 2 or labels.shape[0] != states.shape[1] or labels.shape[1] > MAX_LABEL_DEPTH:
            raise CaptureFileError(f"{where}: step_labels has shape {labels.shape}; damaged")
        if labels.dtype.kind not in "iu":  # cycle numbers; strings would reach exports as object pointers
            raise CaptureFileError(f"{where}: step_labels has dtype {labels.dtype}; damaged")
        safety.check_whole(labels, path)
    signals = safety.hard_child(sub, schema.SIGNALS, path, h5py.Group)
    if signals is not None:
        names = list(signals.keys())
        if len(names) > MAX_SIGNALS:
            raise CaptureFileError(f"{where}: {len(names)} signals; damaged")
        for name in names:
            ds = safety.hard_child(signals, name, path)
            if isinstance(ds, h5py.Dataset):  # anything else is named when the signal is read
                if ds.ndim != 2 or ds.shape[0] != n_tokens or ds.shape[1] > states.shape[1] + 64:
                    raise CaptureFileError(f"{where}: signal {safety.clean(name)!r} has shape {ds.shape}; damaged")
                safety.check_whole(ds, path, virtual_ok=True, sparse=True)
    codec = schema.as_text(safety.read_attrs(states, path).get("compression"))
    if compression.needs_plugin(codec):  # importing hdf5plugin registers the filter with HDF5
        compression.plugin(f"{where} is compressed with {codec!r}, which", CaptureFileError)


def check_readout_vector(ds, path: str, name: str) -> np.ndarray:
    """The readout norm's weight or bias: a 1-D float vector of a sane width that the file really stores."""
    where = safety.clean(path)
    if (
        not isinstance(ds, h5py.Dataset)
        or ds.ndim != 1
        or ds.shape[0] > safety.MAX_HIDDEN
        or ds.dtype.kind not in "fiu"
    ):
        shape = getattr(ds, "shape", None)
        raise CaptureFileError(f"{where}: the readout {name} has shape {shape}; the file is damaged")
    safety.check_whole(ds, path)
    values = np.asarray(ds[()], dtype=np.float64)
    if not np.isfinite(values).all():  # read out, every state would turn NaN and look like a model that blew up
        raise CaptureFileError(f"{where}: the readout {name} holds NaN or infinite values; the index is damaged")
    return values


def readout_number(attrs: dict, name: str, path: str) -> float:
    """The readout norm's ``eps`` or ``weight_offset``: a finite number (0 when absent), eps not negative."""
    value = attrs.get(name, 0.0)
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = float("nan")
    if not np.isfinite(number) or (name == "eps" and number < 0):
        raise CaptureFileError(
            f"{safety.clean(path)}: the readout {name} is {safety.clean(value)!r}; the index is damaged"
        )
    return number
