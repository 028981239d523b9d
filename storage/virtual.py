"""A merged run reads its states and signals from other files, through HDF5 virtual datasets; finding the missing ones.

HDF5 reads a virtual dataset whose source file is gone as its fill value (NaN), not as an error, so the reader
checks a merged run's sources once before it hands out a state. No torch here.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import h5py

from ..errors import MergeError, first_line
from . import layout, safety

if TYPE_CHECKING:
    from .run import Run


def missing_sources(run: Run) -> list[str]:
    """Source files that ``run``'s virtual datasets map onto but that are not there (HDF5 would read NaN)."""
    missing: list[str] = []
    _missing_below(run.group, os.path.abspath(run.path), missing, set())
    return missing


def _missing_below(group: h5py.Group, path: str, missing: list[str], seen: set[str]) -> None:
    """Walk the virtual datasets of one file, and of the files they map (a merge of merges), collecting gaps."""
    folder = os.path.dirname(path)
    sources: list[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for mapping in obj.virtual_sources():
                if mapping.file_name != ".":
                    sources.append(os.path.normpath(os.path.join(folder, mapping.file_name)))

    try:
        group.visititems(visit)
        for source in dict.fromkeys(sources):
            if source in seen:
                continue
            seen.add(source)
            if not os.path.exists(source):
                missing.append(source)
                continue
            with safety.open_h5(source, MergeError, f"{path} maps states in ") as f:  # a FIFO would block
                layout.check_run(f, source)  # a run file, storing what it declares
                _missing_below(f, source, missing, seen)
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise MergeError(f"{path}: cannot list its virtual sources ({first_line(exc)})") from None


def check_sources(run: Run) -> None:
    """A one-line error when a merged run's sources have moved or gone (instead of silently reading NaN)."""
    missing = missing_sources(run)
    if missing:
        raise MergeError(
            f"run {run.index} of {run.capture.path} maps states in {missing[0]}, which is missing"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "; move merged captures together with their sources"
        )
