"""Every file a capture reads: its index, its run folder and run files, and the files its runs map (a merge's).

Commands that write or delete files (export's ``--out``, merge's output and what ``--force`` removes) check their
targets against this first. Writing over any of these destroys data that may not be recaptured, and a merged
capture's states live in other captures' run files, reached only through its virtual datasets, so the mapping is
followed to the end (a merge of merges). Files are compared by identity (device and inode), so a symlink or a hard
link to a protected file is that file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

import h5py

from ..errors import LoopscopeError
from . import run_files, safety


@dataclass
class CaptureFiles:
    """The files and run folders of some captures, each with what it is (for messages)."""

    files: dict[str, str] = field(default_factory=dict)  # path -> what it is
    folders: dict[str, str] = field(default_factory=dict)  # run folder -> what it is (everything inside belongs)

    def holding(self, path: str | os.PathLike) -> str | None:
        """What writing or deleting ``path`` would destroy, as a clause naming ``path`` ("X is a run file of
        capture C"): a protected file (also through a symlink or hard link), or a run folder it is or lies in.
        None when it is neither."""
        path = os.fspath(path)
        real = os.path.realpath(path)
        by_identity, by_name = self._files_index
        known = by_identity.get(safety.file_identity(path)) or by_name.get(real)
        if known is not None:
            return _clause(path, known, self.files[known])
        step = real
        while True:  # the target, then each folder above it (after symlinks: writing follows them)
            folder = self._folders_index.get(safety.file_identity(step))
            if folder is not None:
                what = self.folders[folder]
                inside = f"{safety.clean(path)} is inside {safety.clean(folder)} ({what})"
                return _clause(path, folder, what) if step == real else inside
            parent = os.path.dirname(step)
            if parent == step:
                return None
            step = parent

    @classmethod
    def joined(cls, parts: Iterable[CaptureFiles]) -> CaptureFiles:
        """The files of several captures together (the first to name a file says what it is)."""
        whole = cls()
        for part in parts:
            for path, what in part.files.items():
                whole.files.setdefault(path, what)
            for folder, what in part.folders.items():
                whole.folders.setdefault(folder, what)
        return whole

    @cached_property
    def _files_index(self) -> tuple[dict, dict]:
        """{(device, inode): path} of the files that exist, {real path: path} of all (a missing one too)."""
        by_identity = {safety.file_identity(p): p for p in reversed(self.files)}  # the first listed wins
        by_identity.pop(None, None)
        return by_identity, {os.path.realpath(p): p for p in reversed(self.files)}

    @cached_property
    def _folders_index(self) -> dict:
        found = {safety.file_identity(p): p for p in reversed(self.folders)}
        found.pop(None, None)
        return found


def capture_files(paths: Iterable[str | os.PathLike], *, locking: bool | str | None = None) -> CaptureFiles:
    """The files the captures at ``paths`` (index files) read, their virtual datasets' sources followed."""
    run_files.check_locking(locking)
    found = CaptureFiles()
    kwargs = {} if locking is None else {"locking": locking}
    seen: set[str] = set()
    for index in (os.fspath(p) for p in paths):
        name = safety.clean(index)
        found.files.setdefault(index, f"the index of capture {name}")
        found.folders.setdefault(run_files.runs_dir(index), f"the run folder of capture {name}")
        try:
            runs = [path for path, _ in run_files.list_run_files(index).values()]
        except (OSError, LoopscopeError):  # unlistable: everything in it is protected by the folder entry above
            runs = []
        for run in runs:
            found.files.setdefault(run, f"a run file of capture {name}")
        for run in runs:
            _add_mapped(found, run, name, seen, kwargs)
    return found


def refuse_outputs(capture, outputs: Iterable[str | os.PathLike], why: str) -> None:
    """Refuse any of ``outputs`` (and the ``.partial`` file each is written to first, see ``outputs.write_whole``)
    that ``capture`` reads: its index, its run folder or a file in it, or a file its runs map, also through a link.
    ``why``: what writing there would do, said after the clash."""
    protected = capture_files([capture.path], locking=capture._open_kwargs.get("locking"))
    for out in outputs:
        for path in (os.fspath(out), os.fspath(out) + ".partial"):
            clash = protected.holding(path)
            if clash is not None:
                where = f"--out {clash}" if path == os.fspath(out) else f"--out {out}: {clash}"
                raise LoopscopeError(f"{where}; {why}: choose another --out")


def _clause(path: str, known: str, what: str) -> str:
    same = os.path.abspath(path) == os.path.abspath(known)
    return f"{safety.clean(path)} is {what}" if same else f"{safety.clean(path)} is {safety.clean(known)} ({what})"


def _add_mapped(found: CaptureFiles, path: str, name: str, seen: set[str], kwargs: dict) -> None:
    """Add the files whose datasets ``path`` maps, and theirs in turn (each file visited once: merges may cycle)."""
    todo = [path]
    while todo:
        current = todo.pop()
        key = os.path.realpath(current)
        if key in seen:
            continue
        seen.add(key)
        for source in _virtual_sources(current, kwargs):
            found.files.setdefault(source, f"a file that capture {name} maps: its states live there")
            todo.append(source)


def _virtual_sources(path: str, kwargs: dict) -> list[str]:
    """The files that ``path``'s virtual datasets map, found where HDF5 finds them (``safety.mapped_file``, which the
    readers and ``verify`` check too). An unreadable file maps nothing here (the command reading it says what is
    wrong)."""
    names: list[str] = []

    def visit(name, obj):  # hard links only: soft and external links are not followed
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            names.extend(m.file_name for m in obj.virtual_sources() if m.file_name != ".")

    try:
        with safety.open_h5(path, **kwargs) as f:  # refuses a FIFO or device before HDF5 opens it
            f.visititems(visit)
    except (LoopscopeError, OSError, KeyError, ValueError, RuntimeError, TypeError):
        return []
    return [safety.mapped_file(path, name) for name in dict.fromkeys(names) if "\0" not in name]
