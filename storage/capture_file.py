"""Creating a capture file for writing: path checks, h5py options, the header and the readout norm."""

from __future__ import annotations

import json
import os
from typing import Any

import h5py
import numpy as np

from . import schema
from .errors import CaptureFileError

MODES = ("w-", "x", "w", "a")


def open_for_write(
    path: str | os.PathLike, mode: str = "w-", *, locking: bool | str | None = None, cache_bytes: int = 64 << 20
) -> h5py.File:
    """Open ``path`` for a new capture, refusing to clobber data unless asked.

    ``mode`` follows h5py: ``"w-"``/``"x"`` (default) refuse an existing file, ``"w"`` overwrites it, ``"a"`` appends
    runs to an existing loopscope capture. ``locking`` is passed to h5py (``False`` on network file systems
    whose locks fail).
    """
    path = os.fspath(path)
    if mode not in MODES:
        raise CaptureFileError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CaptureFileError(f"cannot create {path}: directory {parent} does not exist; create it first")
    if os.path.isdir(path):
        raise CaptureFileError(f"cannot write {path}: it is a directory; pass a file name such as {path}/run.h5")
    exists = os.path.exists(path)
    if exists and mode in ("w-", "x"):
        raise CaptureFileError(f"{path} already exists; pass mode='w' to overwrite it or mode='a' to add runs to it")
    if exists and mode == "a":
        from .reader import CaptureFile

        CaptureFile(path, locking=locking).close()  # validates that it is a capture we can extend
    kwargs: dict[str, Any] = {"libver": "latest", "rdcc_nbytes": cache_bytes, "rdcc_w0": 1.0}
    if locking is not None:
        kwargs["locking"] = locking
    try:
        return h5py.File(path, mode, **kwargs)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureFileError(
            f"cannot open {path} for writing ({first}); on a network file system try locking=False"
        ) from None


def write_header(file: h5py.File, header: dict[str, Any]) -> None:
    """Root attributes: format, versions, model, options. Dicts and lists are stored as ``*_json`` strings."""
    file.attrs["format"] = schema.FORMAT_NAME
    file.attrs["format_version"] = schema.FORMAT_VERSION
    for key, value in header.items():
        if isinstance(value, (dict, list, tuple)):
            file.attrs[f"{key}_json"] = json.dumps(value, default=str)
        elif value is None:
            file.attrs[key] = ""
        elif isinstance(value, str):
            file.attrs[key] = str(value)  # plain str: subclasses such as torch's TorchVersion confuse h5py
        else:
            file.attrs[key] = value


def write_readout(file: h5py.File, readout: dict[str, Any] | None) -> None:
    """Store the final norm's kind, eps and parameters (float32) so analysis can apply it without the model."""
    if schema.READOUT in file:
        del file[schema.READOUT]
    group = file.create_group(schema.READOUT)
    if not readout:
        group.attrs["kind"] = "none"
        return
    group.attrs["kind"] = readout["kind"]
    group.attrs["eps"] = float(readout.get("eps", 0.0))
    group.attrs["weight_offset"] = float(readout.get("weight_offset", 0.0))
    group.attrs["module"] = readout.get("module", "")
    for name in ("weight", "bias"):
        if readout.get(name) is not None:
            group.create_dataset(name, data=np.asarray(readout[name], dtype=np.float32))


def next_run_index(file: h5py.File) -> int:
    """The first free run number (appending continues the numbering)."""
    if schema.RUNS not in file:
        return 0
    names = list(file[schema.RUNS].keys())
    return max((int(n) for n in names), default=-1) + 1
