"""A merged run reads its states and signals from other files, through HDF5 virtual datasets; finding the missing ones.

HDF5 reads a virtual dataset whose source file is gone as its fill value (NaN), not as an error, so the reader
checks a merged run's sources once before it hands out a state. The same walk refuses mappings HDF5 cannot survive:
a dataset that maps itself, directly or through other files, makes HDF5 recurse until the process crashes. No torch
here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..errors import CaptureFileError, MergeError, first_line
from . import layout, safety, schema

if TYPE_CHECKING:
    from .run import Run

# Files one read may pass through (a merge of a merge of ...): far more than any study nests, few enough to walk.
MAX_DEPTH = 32


@dataclass(frozen=True)
class _Hop:
    """One file on the way down from the run's own file, and the dataset of it that maps onto the next."""

    identity: object
    path: str
    dataset: str


def missing_sources(run: Run) -> list[str]:
    """Source files that ``run``'s virtual datasets map onto but that are not there (HDF5 would read NaN)."""
    return check_mappings(run.group, run.path)


def check_mappings(group: h5py.Group, path: str) -> list[str]:
    """Walk the virtual datasets of the file ``group`` (opened from ``path``) and of the files they map, depth first.

    A cycle, a chain of more than MAX_DEPTH files, or a source that is no run file or lacks the dataset mapped is a
    one-line error (HDF5 would crash, or read NaN); returns the source files that are missing."""
    missing: dict[str, None] = {}
    _walk(group, path, path, [], set(), missing)
    return list(missing)


def _walk(group: h5py.Group, path: str, root: str, chain: list[_Hop], done: set, missing: dict[str, None]) -> None:
    """Visit one file: each source file it maps is checked, then walked unless walked already (a diamond of merges
    is no cycle); ``chain`` holds the files above this one, so meeting one of them again is a cycle."""
    try:
        identity = safety.file_identity(path)
        for source, datasets in _mappings(group, path).items():
            hops = [*chain, _Hop(identity, path, datasets[0][0])]
            if not os.path.exists(source):
                missing[source] = None
                continue
            target = safety.file_identity(source)
            for j, hop in enumerate(hops):
                if hop.identity == target:
                    raise CaptureFileError(_cycle(root, hops, j))
            if len(hops) >= MAX_DEPTH:
                subject, plural = _subject(hops[0].dataset)
                raise CaptureFileError(
                    f"{safety.clean(root)}: the {subject} {'map' if plural else 'maps'} through a chain of more than "
                    f"{MAX_DEPTH} files of virtual datasets; the file is damaged"
                )
            with safety.open_h5(source, MergeError, f"{safety.clean(path)} maps states in ") as f:  # a FIFO blocks
                attrs = layout.check_run(f, source)  # a run file, storing what it declares
                _check_same_source(group, path, source, attrs)
                for dataset, name in datasets:
                    if safety.hard_dataset(f, name, source) is None:  # HDF5 would read the fill value
                        raise CaptureFileError(
                            f"{safety.clean(path)}: {safety.clean(dataset)} maps {safety.clean(name)} of "
                            f"{safety.clean(source)}, which that file lacks; the file is damaged"
                        )
                if target not in done:
                    _walk(f, source, root, hops, done, missing)
        done.add(identity)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise MergeError(f"{path}: cannot list its virtual sources ({first_line(exc)})") from None


def _check_same_source(group: h5py.Group, path: str, source: str, attrs: dict) -> None:
    """A merged run records the capture id and run number of the source run file it maps (``merge.SOURCE_ATTRS``):
    a source captured again over the old one (same shapes) would otherwise be read as if it were the one merged."""
    own = safety.read_attrs(group, path)
    want = {key: own.get(f"source_{key}") for key in ("capture_id", "run_number")}
    if all(value is None for value in want.values()):
        return  # merged before these were recorded, or no merged run
    have = {key: attrs.get(key) for key in want}
    if any(value is not None and _plain(value) != _plain(have[key]) for key, value in want.items()):
        raise MergeError(
            f"{safety.clean(path)}: the source run {safety.clean(source)} is no longer the one merged (captured "
            "again since?); merge again"
        )


def _plain(value) -> object:
    """An attribute as text or a Python number, so that one stored as bytes or as numpy compares equal."""
    text = schema.as_text(value)
    if text is not None:
        return text
    if isinstance(value, np.ndarray):  # no loopscope file stores one here: compared as its bytes
        return (value.dtype.str, value.shape, value.tobytes())
    return value.item() if isinstance(value, np.generic) else value


def _mappings(group: h5py.Group, path: str) -> dict[str, list[tuple[str, str]]]:
    """{source file: [(virtual dataset, source dataset name)]} of every virtual dataset in the file, in file order."""
    found: dict[str, list[tuple[str, str]]] = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            safety.check_virtual(obj, path)  # before HDF5 could open a source while listing them
            for mapping in obj.virtual_sources():
                source = safety.mapped_file(path, mapping.file_name)  # "." is this very file: a cycle
                found.setdefault(source, []).append((obj.name, mapping.dset_name))

    group.visititems(visit)  # hard links only: external links are not followed
    return {source: list(dict.fromkeys(pairs)) for source, pairs in found.items()}


def _cycle(root: str, hops: list[_Hop], j: int) -> str:
    """The one line for a cycle: ``hops[j]``'s file is reached again from the last hop."""
    through = [safety.clean(hop.path) for hop in hops[j + 1 :]]
    via = f" through {', '.join(through[:3])}{', ...' if len(through) > 3 else ''}" if through else ""
    subject, plural = _subject(hops[j].dataset)
    itself = f"{'map themselves' if plural else 'maps itself'}{via} (a cycle of virtual datasets); the file is damaged"
    if j == 0:
        return f"{safety.clean(root)}: the {subject} {itself}"
    first, first_plural = _subject(hops[0].dataset)
    return (
        f"{safety.clean(root)}: the {first} {'map' if first_plural else 'maps'} {safety.clean(hops[j].path)}, "
        f"whose {subject} {itself}"
    )


def _subject(name: str) -> tuple[str, bool]:
    """A dataset in the capture's terms (states of loop 'core'), and whether it is plural."""
    parts = name.strip("/").split("/")
    if len(parts) == 3 and parts[0] == schema.LOOPS and parts[2] == "states":
        return f"states of loop {safety.clean(parts[1])!r}", True
    if len(parts) == 4 and parts[0] == schema.LOOPS and parts[2] == schema.SIGNALS:
        return f"signal {safety.clean(parts[3])!r} of loop {safety.clean(parts[1])!r}", False
    return f"dataset {safety.clean(name)}", False


def check_sources(run: Run) -> None:
    """A one-line error when a merged run's sources have moved or gone (instead of silently reading NaN)."""
    missing = missing_sources(run)
    if missing:
        raise MergeError(
            f"run {run.index} of {run.capture.path} maps states in {missing[0]}, which is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; move merged captures together with their sources"
        )
