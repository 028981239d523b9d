"""Reading capture files back, without torch.

``CaptureFile`` validates the file once (format name and version) so that every later access can trust the layout;
anything unexpected becomes a one-line :class:`CaptureFileError`. Its runs are :class:`Run` objects (``run.py``),
which read lazily; the readout norm it loads is a :class:`ReadoutNorm` (``readout.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import h5py
import numpy as np

from ..errors import CaptureFileError, LoopscopeError
from . import layout, run_files, safety, schema
from .damage import reading
from .readout import ReadoutNorm
from .run import Run


class CaptureFile:
    """A capture file opened for reading. Use as a context manager or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike, *, locking: bool | str | None = None, missing: str = "error"):
        """``missing="skip"`` reads the runs that are there when run files the index links are missing (by
        default that is an error: a deleted run must not vanish silently)."""
        self.path = os.fspath(path)
        if missing not in MISSING:
            raise CaptureFileError(f"missing={missing!r} is not one of {', '.join(map(repr, MISSING))}")
        self.missing = missing
        run_files.check_locking(locking)
        self.locking = locking  # a reference capture named by path is opened as this one was
        self._open_kwargs: dict[str, Any] = {} if locking is None else {"locking": locking}
        self._file = safety.open_h5(self.path, **self._open_kwargs)
        # Read the whole (small) index now and let go of it, so a capture still running can link its runs in.
        try:
            with reading(self.path):
                self._attrs = safety.read_attrs(self._file, self.path)
                self._validate()
                self.readout = self._read_readout()
                self._linked = _linked_runs(self._file, self.path)
                # /runs is written at a clean close (storage/index.py): with it and no links, the capture is empty
                self._closed_empty = not self._linked and self._file.get(schema.RUNS, getlink=True) is not None
                _ = self.loop_names  # parse the loop list now: a damaged one fails here, once
        finally:
            self._file.close()
        if missing == "error":
            self._check_run_files()

    def _validate(self) -> None:
        attrs = self._attrs
        kind = schema.as_text(attrs.get("format"))
        if kind == schema.RUN_FORMAT_NAME:
            raise CaptureFileError(
                f"{self.path} is one run's file; open the capture's index file "
                f"(the .h5 beside {os.path.dirname(self.path)})"
            )
        if kind != schema.FORMAT_NAME:
            raise CaptureFileError(f"{self.path} is an HDF5 file but not a loopscope capture (no 'format' attribute)")
        version = int(attrs.get("format_version", -1))
        if version > schema.FORMAT_VERSION:
            raise CaptureFileError(
                f"{self.path} has capture format version {version}, newer than this loopscope reads "
                f"({schema.FORMAT_VERSION}); upgrade loopscope"
            )
        if version < 1:
            raise CaptureFileError(f"{self.path} has an invalid capture format version {version}")

    # ---- file-level metadata ---------------------------------------------------------------------------------------
    @cached_property
    def meta(self) -> dict:
        """Every root attribute, JSON strings decoded (a damaged one is kept as its text)."""
        out = {}
        for key, value in self._attrs.items():
            value = schema.text_or(value, value)
            if isinstance(value, str) and key.endswith("_json"):
                value = safety.parse_json(value)  # damaged, huge or absurdly deep: kept as text
            elif isinstance(value, np.generic):
                value = value.item()
            out[key] = value
        return out

    @cached_property
    def loop_names(self) -> list[str]:
        """The loops this capture recorded, the primary one first."""
        names = safety.parse_json(schema.text_or(self._attrs.get("loops_json", "[]"), ""))
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CaptureFileError(f"{self.path}: the loops_json attribute is damaged")
        return names

    def _read_readout(self) -> ReadoutNorm:
        group = safety.hard_child(self._file, schema.READOUT, self.path, h5py.Group)
        if group is None:
            return ReadoutNorm("none", None, None, 0.0, 0.0)
        attrs = safety.read_attrs(group, self.path)
        kind = attrs.get("kind", "none")
        vectors = {}
        for name in ("weight", "bias"):
            ds = safety.hard_child(group, name, self.path)
            vectors[name] = None if ds is None else layout.check_readout_vector(ds, self.path, name)
        return ReadoutNorm(
            kind=schema.text_or(kind, str(kind)),
            weight=vectors["weight"],
            bias=vectors["bias"],
            eps=layout.readout_number(attrs, "eps", self.path),
            weight_offset=layout.readout_number(attrs, "weight_offset", self.path),
        )

    def _check_run_files(self) -> None:
        """Every run the index links (after a clean close: every completed run) must be in the run folder; a
        deleted run file must not vanish from the listing, or shift which run ``runs[0]`` is."""
        folder = run_files.runs_dir(self.path)
        if not os.path.isdir(folder):
            if self._closed_empty:  # closed with no runs: nothing in the folder to lose (git keeps no empty folder)
                return
            held = f"the {len(self._linked)} run(s) the index links" if self._linked else "every run of the capture"
            raise CaptureFileError(
                f"{self.path}: its run folder {folder} is missing (it holds {held}); copy or move the .h5 "
                "together with its .runs folder, and restore the folder"
            )
        hint = "or open with missing='skip' (loopscope.open(path, missing='skip'), --missing skip) to read the rest"
        gone = self.missing_runs
        if gone:
            raise CaptureFileError(
                f"{self.path}: run file(s) {_number_list(gone)} that the index links are missing from {folder}; "
                f"restore them, {hint}"
            )

    @cached_property
    def runs(self) -> list[Run]:
        """Completed runs in capture order (one per batch row of each forward or generate call)."""
        return [
            Run(self, number, path)
            for number, (path, complete) in run_files.list_run_files(self.path).items()
            if complete
        ]

    @property
    def missing_runs(self) -> list[int]:
        """Runs the index links whose files are not in the run folder (only ``missing="skip"`` opens such a
        capture): said beside the runs that are read, so a skipped run is never silently gone."""
        present = {n for n, (_, complete) in run_files.list_run_files(self.path).items() if complete}
        return [n for n in self._linked if n not in present]

    @property
    def incomplete_runs(self) -> list[str]:
        """Files of runs still being written, or cut short (the writer was killed or failed)."""
        return [path for path, complete in run_files.list_run_files(self.path).values() if not complete]

    def run(self, index: int) -> Run:
        """The completed run numbered ``index``: its ``Run.index``, as ``loopscope info`` and the run files show.
        Numbers are never reused, so a run cut short leaves a gap. A negative index counts back from the last
        complete run (-1: the last). A clear error when there is no such run."""
        runs = self.runs
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise CaptureFileError(f"a run index is an integer (see `loopscope info`), got {index!r}")
        if not runs:
            raise CaptureFileError(f"{self.path} has no complete runs")
        index = int(index)
        if index < 0:
            if index < -len(runs):
                raise CaptureFileError(f"{self.path} has {len(runs)} complete run(s); run {index} counts back too far")
            return runs[index]
        for run in runs:
            if run.index == index:
                return run
        numbers = [run.index for run in runs]
        if index in run_files.list_run_files(self.path):
            raise CaptureFileError(
                f"run {index} of {self.path} is incomplete (cut short, or still being written); "
                f"its complete runs are {_number_list(numbers)}"
            )
        raise CaptureFileError(f"{self.path} has no run {index}; its complete runs are {_number_list(numbers)}")

    def select(self, indices: Sequence[int], what: str = "run") -> list[Run]:
        """The runs ``indices`` name (as :meth:`run` reads each), in order; one named twice (``1, 1``, or ``0, -3``
        of three runs) is refused, since it would be measured, drawn or exported twice. ``what`` names the option
        in the message (the CLI's ``--run``)."""
        chosen: list[Run] = []
        given: dict[int, int] = {}
        for index in indices:
            run = self.run(index)
            if run.index in given:
                first = given[run.index]
                if first == index:
                    raise LoopscopeError(f"{what} {index} is given twice; name each run once")
                raise LoopscopeError(f"{what} {first} and {what} {index} both name run {run.index}; name each run once")
            given[run.index] = int(index)
            chosen.append(run)
        return chosen

    def close(self) -> None:
        for run in self.__dict__.get("runs", []):
            run.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<loopscope capture {self.path!r}: {len(self.runs)} run(s), loops {self.loop_names}>"

    def _repr_html_(self) -> str:  # Jupyter: header and a table of runs (display.py)
        from .display import capture_html

        return capture_html(self)


MISSING = ("error", "skip")


def _number_list(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def _linked_runs(index: h5py.File, path: str) -> list[int]:
    """Run numbers the index links as /runs/NNNNNN (read as links, never followed)."""
    group = safety.hard_child(index, schema.RUNS, path, h5py.Group)
    names = list(group.keys()) if group is not None else []
    return sorted(
        int(name)
        for name in names
        if name.isascii()
        and name.isdigit()
        and name == schema.run_name(int(name))
        and isinstance(group.get(name, getlink=True), h5py.ExternalLink)
    )
