"""Where a capture lives on disk, and how it is created and finished.

A capture named ``run.h5`` is an *index* file plus one HDF5 file per run::

    run.h5                  header (format, versions, model, config, loop adapter, options) and /readout;
                            after a clean close also /runs/NNNNNN as external links to the run files
    run.h5.runs/NNNNNN.h5   one finished run (its root group is the run)
    run.h5.runs/NNNNNN.partial.h5   a run being written, or cut short by a crash or an error

Why not one file: an HDF5 file that is open for writing when its process is killed, or whose disk fills up, can be
left unreadable as a whole (truncated superblock), taking every earlier run with it. Here a run's file is closed
and atomically renamed when the run completes, and the index is only open for a moment at the start and at the
end, so a killed or failed capture keeps every completed run, and another process can read completed runs while
the capture goes on. The reader finds runs by listing the directory; the links are a convenience for plain h5py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from typing import Any

import h5py
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock, run numbers are still reserved with O_EXCL
    fcntl = None  # type: ignore[assignment]

from . import checksum, schema
from .errors import CaptureFileError, CaptureWriteError, first_line

MODES = ("w-", "x", "w", "a")
RUN_FILE = re.compile(r"^(\d{6,})(\.partial)?\.h5$")


def runs_dir(index_path: str) -> str:
    """The directory holding the run files of the capture whose index is ``index_path``."""
    return index_path + ".runs"


def list_run_files(index_path: str) -> dict[int, tuple[str, bool]]:
    """{run index: (file path, complete)} for every run file present. Only canonical names count
    (``run_name(n)`` + ".h5" or ".partial.h5"): a stray ``0000000.h5`` must not stand in for run 0."""
    folder = runs_dir(index_path)
    found: dict[int, tuple[str, bool]] = {}
    if not os.path.isdir(folder):
        return found
    for name in os.listdir(folder):
        parsed = _run_file_name(name)
        if parsed is not None:
            index, complete = parsed
            if complete or index not in found:
                found[index] = (os.path.join(folder, name), complete)
    return dict(sorted(found.items()))


def _run_file_name(name: str) -> tuple[int, bool] | None:
    """(run number, complete) for a canonical run file name, else None."""
    match = RUN_FILE.match(name)
    if match is None or match.group(1) != schema.run_name(int(match.group(1))):
        return None
    return int(match.group(1)), match.group(2) is None


def unexpected_files(index_path: str) -> list[str]:
    """Names in the run folder that are not run files (ignored by the reader; ``info`` mentions them)."""
    folder = runs_dir(index_path)
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(name for name in names if _run_file_name(name) is None)


def check_locking(locking) -> None:
    """h5py's ``locking=`` values (None: HDF5's default); anything else is a one-line error, not h5py's later."""
    if not (locking is None or locking is True or locking is False or locking == "best-effort"):
        raise CaptureFileError(f"locking={locking!r} is not one of None, True, False, 'best-effort'")


def _h5_kwargs(locking, cache_bytes: int | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"libver": "latest"}
    if cache_bytes is not None:
        kwargs.update(rdcc_nbytes=cache_bytes, rdcc_w0=1.0)
    if locking is not None:
        kwargs["locking"] = locking
    return kwargs




def check_target(path: str | os.PathLike, mode: str = "w-", locking: bool | str | None = None) -> bool:
    """Whether a capture may be written at ``path`` with ``mode``, checked without writing anything (so a caller
    can find out before an expensive model load). Returns whether a capture is already there."""
    path = os.fspath(path)
    check_locking(locking)
    if mode not in MODES:
        raise CaptureFileError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CaptureFileError(f"cannot create {path}: directory {parent} does not exist; create it first")
    if os.path.isdir(path):
        raise CaptureFileError(f"cannot write {path}: it is a directory; pass a file name such as {path}/run.h5")
    exists = os.path.exists(path) or bool(list_run_files(path))
    if exists and mode in ("w-", "x"):
        raise CaptureFileError(f"{path} already exists; pass mode='w' to overwrite it or mode='a' to add runs to it")
    if exists and mode == "a":
        from .reader import CaptureFile

        CaptureFile(path, locking=locking).close()  # validates that it is a capture we can extend
    return exists


def create_index(
    path: str | os.PathLike,
    mode: str = "w-",
    *,
    header: dict[str, Any],
    readout: dict[str, Any] | None,
    locking: bool | str | None = None,
) -> str:
    """Create (or, with mode "a", validate) the index file; returns its path. Nothing stays open.

    ``mode`` follows h5py: "w-"/"x" (default) refuse an existing capture, "w" replaces it (its run files too),
    "a" adds runs to an existing loopscope capture. ``locking`` is passed to h5py (False on network file systems
    whose locks fail).
    """
    path = os.fspath(path)
    check_target(path, mode, locking)  # refuse early, before anything is made
    try:
        if not (mode == "a" and os.path.exists(path)):
            os.makedirs(runs_dir(path), exist_ok=True)
        with _index_lock(path, locking):  # checked again under the lock: another writer may have just made it
            if check_target(path, mode, locking) and mode == "a":
                _check_same_model(path, header, readout, locking)
                return path
            if mode == "w":
                for run_path, _ in list_run_files(path).values():
                    os.remove(run_path)
            with _replaced_atomically(path, locking, start_from=None) as index:
                _write_header(index, {**header, "capture_id": uuid.uuid4().hex})
                _write_readout(index, readout)
    except OSError as exc:
        raise CaptureFileError(
            f"cannot create {path} ({first_line(exc)}); on a network file system try locking=False"
        ) from None
    return path


def _check_same_model(path: str, header: dict[str, Any], readout: dict[str, Any] | None, locking) -> None:
    """Runs added to a capture must come from the model it describes: analysis reads every run out through the
    one readout norm the index stores, and a run of another model would be measured in the wrong space."""
    from .reader import CaptureFile, ReadoutNorm

    with CaptureFile(path, locking=locking) as capture:
        model_class, loops, stored = capture.meta.get("model_class"), capture.loop_names, capture.readout
    if model_class != header.get("model_class") or loops != list(header.get("loops", [])):
        raise CaptureFileError(
            f"{path} holds runs of {model_class} (loops {loops}), not of {header.get('model_class')} "
            f"(loops {list(header.get('loops', []))}); write this model's runs to another capture file"
        )
    if not stored.same_as(ReadoutNorm.from_params(readout)):
        raise CaptureFileError(
            f"{path} stores another readout norm than this model's {(readout or {}).get('module') or 'none'} "
            "(another checkpoint or size?); write this model's runs to another capture file"
        )


def finish_index(path: str, attrs: dict[str, Any], locking: bool | str | None = None) -> None:
    """At a clean close: link every completed run into the index (so plain h5py sees them) and store stats.
    Under the folder lock the copy starts from the newest index, so a writer appending at the same time keeps its
    links. A failure (a full disk) is a CaptureWriteError: the runs stay in the folder, where the reader finds them.

    The index is edited as a copy that replaces it atomically: a kill in the middle leaves the old index, which
    still finds every run through the run directory.
    """
    try:
        with _index_lock(path, locking), _replaced_atomically(path, locking, start_from=path) as index:
            runs = index.require_group(schema.RUNS)
            for number, (run_path, complete) in list_run_files(path).items():
                name = schema.run_name(number)
                if complete and name not in runs:
                    relative = os.path.relpath(run_path, os.path.dirname(os.path.abspath(path)))
                    runs[name] = h5py.ExternalLink(relative, "/")
            index.attrs.update(schema.attrs_to_store(attrs))
    except OSError as exc:
        raise CaptureWriteError(
            f"could not link the runs into {path} ({first_line(exc)}); every completed run is kept in "
            f"{runs_dir(path)} and reads as usual"
        ) from None


@contextlib.contextmanager
def _replaced_atomically(path: str, locking, *, start_from: str | None):
    """Yield an h5py file written as ``path + ".tmp"`` (a copy of ``start_from``, or empty), flushed to disk and
    renamed over ``path`` on success; on failure ``path`` is untouched and the temporary file removed."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # per writer: two never share one
    if start_from is not None:
        shutil.copyfile(start_from, tmp)
    try:
        with h5py.File(tmp, "a" if start_from else "w", **_h5_kwargs(locking)) as index:
            yield index
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _fsync(path: str) -> None:
    """Push a file's (or a directory's entries') data to disk, so a rename never points at unwritten bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def next_run_index(path: str) -> int:
    """The first free run number (appending continues the numbering)."""
    return max(list_run_files(path), default=-1) + 1


class RunFiles:
    """Creates run files as ``.partial.h5`` and renames them into place when they complete.

    Run numbers are reserved on disk, not counted in memory: several processes may append to one capture at once
    (two jobs on one study file), and a number fixed at attach would let one rename its run over another's. A
    number is ours once ``NNNNNN.partial.h5`` was created with ``O_EXCL`` and no ``NNNNNN.h5`` exists; a run
    always exists under one of the two names, so no two writers ever hold the same number. The caller's run keys
    map to the numbers reserved for them.
    """

    # No chunk cache in run files: states are written as whole chunks (storage/staging.py) and token metadata in
    # blocks of up to writer.TOKEN_CHUNK tokens (each touching one or two chunks), so a cache would only copy; and
    # a chunk left dirty in it by a failed write is flushed again when HDF5 shuts down, which could crash the
    # process at exit.
    def __init__(self, index_path: str, *, locking: bool | str | None = None, cache_bytes: int = 0):
        self.index_path = index_path
        self.folder = runs_dir(index_path)
        self.locking = locking
        self.cache_bytes = cache_bytes
        self.capture_id = _capture_id(index_path)
        self._numbers: dict[int, int] = {}  # caller's run key -> run number reserved on disk
        self._next = -1

    def number_of(self, key: int) -> int:
        """The run number reserved for the caller's run ``key``."""
        return self._numbers[key]

    def partial_path(self, key: int) -> str:
        return self._path(self._numbers.get(key, key), ".partial.h5")

    def final_path(self, key: int) -> str:
        return self._path(self._numbers.get(key, key), ".h5")

    def _path(self, number: int, suffix: str) -> str:
        return os.path.join(self.folder, f"{schema.run_name(number)}{suffix}")

    def _reserve(self) -> int:
        """The next free run number, taken atomically against every other process writing to this capture."""
        os.makedirs(self.folder, exist_ok=True)
        candidate = self._next if self._next >= 0 else next_run_index(self.index_path)
        while True:
            try:
                os.close(os.open(self._path(candidate, ".partial.h5"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:  # another writer's run: look past everything on disk now
                candidate = max(candidate + 1, next_run_index(self.index_path))
                continue
            if os.path.exists(self._path(candidate, ".h5")):  # finished by another writer just before
                os.remove(self._path(candidate, ".partial.h5"))
                candidate = max(candidate + 1, next_run_index(self.index_path))
                continue
            self._next = candidate + 1
            return candidate

    def create_run(self, key: int) -> h5py.File:
        number = self._reserve()
        self._numbers[key] = number
        run = h5py.File(self._path(number, ".partial.h5"), "w", **_h5_kwargs(self.locking, self.cache_bytes))
        run.attrs["format"] = schema.text(schema.RUN_FORMAT_NAME)
        run.attrs["format_version"] = schema.FORMAT_VERSION
        run.attrs["run_number"] = number
        if self.capture_id:
            run.attrs["capture_id"] = schema.text(self.capture_id)
        return run

    def finish_run(self, key: int, run: h5py.File, *, complete: bool) -> str:
        """Close the run's file; a complete run is renamed atomically to its final name. Returns the file's path."""
        number = self._numbers.pop(key)
        run.close()
        partial = self._path(number, ".partial.h5")
        if not complete:
            return partial
        # No fsync here: a killed process loses nothing that reached the page cache, and an fsync per run would
        # cost more than the run's own writes. (The index, written twice per capture, is fsynced.)
        os.replace(partial, self._path(number, ".h5"))
        return self._path(number, ".h5")


def _capture_id(index_path: str) -> str:
    """The index's ``capture_id`` (written into every run file, so a run of another capture is recognised)."""
    try:
        with h5py.File(index_path, "r") as index:
            return schema.as_text(index.attrs.get("capture_id")) or ""
    except OSError:
        return ""


@contextlib.contextmanager
def _index_lock(path: str, locking):
    """Hold an exclusive lock on the capture's run folder while the index is created or rewritten, so writers
    appending at once neither replace each other's index nor lose each other's links. ``locking=False`` (file
    systems without working locks) skips it: run numbers stay safe (O_EXCL), only links may be lost, and the
    reader finds runs by listing the folder anyway."""
    if locking is False or fcntl is None:
        yield
        return
    fd = os.open(runs_dir(path), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if locking != "best-effort":
                raise CaptureFileError(
                    f"cannot lock {runs_dir(path)} ({first_line(exc)}); on a network file system pass locking=False"
                ) from None
        yield
    finally:
        os.close(fd)


def _write_header(file: h5py.File, header: dict[str, Any]) -> None:
    """Root attributes: format, versions, model, options. Dicts and lists are stored as ``*_json`` strings."""
    file.attrs["format"] = schema.text(schema.FORMAT_NAME)
    file.attrs["format_version"] = schema.FORMAT_VERSION
    file.attrs.update(schema.attrs_to_store(header))


def _write_readout(file: h5py.File, readout: dict[str, Any] | None) -> None:
    """Store the final norm's kind, eps and parameters (float32) so analysis can apply it without the model."""
    group = file.create_group(schema.READOUT)
    if not readout:
        group.attrs["kind"] = schema.text("none")
        return
    group.attrs["kind"] = schema.text(readout["kind"])
    group.attrs["eps"] = float(readout.get("eps", 0.0))
    group.attrs["weight_offset"] = float(readout.get("weight_offset", 0.0))
    group.attrs["module"] = schema.text(readout.get("module", ""))
    for name in ("weight", "bias"):
        if readout.get(name) is not None:
            values = np.asarray(readout[name], dtype=np.float32)
            group.create_dataset(name, data=values, **checksum.dataset_options(values.shape))
