"""Where a capture's runs live on disk: the run folder, its file names, and reserving run numbers.

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
import errno
import os
import re
import weakref
from typing import Any

import h5py

try:
    import fcntl
except ImportError:  # not POSIX: no writer lock (mode="w" cannot see another writer; run numbers stay safe)
    fcntl = None  # type: ignore[assignment]

from ..errors import CaptureFileError, CaptureWriteError, first_line
from . import safety, schema
from .write.objects import write_attrs

RUN_FILE = re.compile(r"^(\d{6,})(\.partial)?\.h5$")
#: In the run folder while a capture writes: each writing capture holds a shared flock on it (see WriterLock).
LOCK_FILE = ".writers.lock"


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
    try:
        names = os.listdir(folder)
    except OSError as exc:  # no read or search permission: every run is out of reach, say so once
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # not the folder's fault
            hint = "close other files, or raise the open-file limit (ulimit -n)"
        else:
            hint = "check its permissions"
        raise CaptureFileError(
            f"cannot list the run folder {safety.clean(folder)} ({exc.strerror or exc}); {hint}"
        ) from None
    for name in names:
        parsed = run_file_name(name)
        if parsed is not None:
            index, complete = parsed
            if complete or index not in found:
                found[index] = (os.path.join(folder, name), complete)
    return dict(sorted(found.items()))


def run_file_name(name: str) -> tuple[int, bool] | None:
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
    return sorted(name for name in names if run_file_name(name) is None and name != LOCK_FILE)


def check_locking(locking) -> None:
    """h5py's ``locking=`` values (None: HDF5's default); anything else is a one-line error, not h5py's later."""
    if not (locking is None or locking is True or locking is False or locking == "best-effort"):
        raise CaptureFileError(f"locking={locking!r} is not one of None, True, False, 'best-effort'")


def h5_kwargs(locking, cache_bytes: int | None = None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"libver": schema.LIBVER}  # readable by HDF5 1.10 tools (see schema.LIBVER)
    if cache_bytes is not None:
        kwargs.update(rdcc_nbytes=cache_bytes, rdcc_w0=1.0)
    if locking is not None:
        kwargs["locking"] = locking
    return kwargs


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
    def __init__(
        self, index_path: str, *, locking: bool | str | None = None, cache_bytes: int = 0, capture_id: str = ""
    ):
        """``capture_id``: that of a capture whose index is written after its runs (merge), instead of the index's."""
        self.index_path = index_path
        self.folder = runs_dir(index_path)
        self.locking = locking
        self.cache_bytes = cache_bytes
        self._index_first = not capture_id  # then the index is checked before each run is made or renamed
        self.capture_id = capture_id or _capture_id(index_path, locking)
        self._index_seen: tuple[int, ...] = ()  # the index's stat when it was last found to be this capture's
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
        self._check_index()
        if not os.path.isdir(self.folder):  # the run folder alone was removed (its index is there): made again
            with contextlib.suppress(FileExistsError):
                os.mkdir(self.folder)  # not makedirs: a removed output directory is not silently made again
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

    def create_run(self, key: int, attrs: dict[str, Any] | None = None) -> h5py.File:
        """A new run file, its header attributes and ``attrs`` (ready to store) set."""
        number = self._reserve()
        path = self._path(number, ".partial.h5")
        run = None
        try:
            run = h5py.File(path, "w", **h5_kwargs(self.locking, self.cache_bytes))
            header: dict[str, Any] = {
                "format": schema.text(schema.RUN_FORMAT_NAME),
                "format_version": schema.FORMAT_VERSION,
                "run_number": number,
            }
            if self.capture_id:
                header["capture_id"] = schema.text(self.capture_id)
            write_attrs(run, {**header, **(attrs or {})})
        except BaseException:  # a full disk: the number's reserved (empty) file would stand as a run cut short
            with contextlib.suppress(Exception):
                if run is not None:
                    run.close()
            with contextlib.suppress(OSError):
                os.remove(path)
            raise
        self._numbers[key] = number
        return run

    def finish_run(self, key: int, run: h5py.File, *, complete: bool) -> str:
        """Close the run's file; a complete run is renamed atomically to its final name. Returns the file's path."""
        number = self._numbers.pop(key)
        run.close()
        partial = self._path(number, ".partial.h5")
        if not complete:
            return partial
        self._check_index()  # never renamed into a capture that replaced this one (it stays .partial.h5)
        # No fsync here: a killed process loses nothing that reached the page cache, and an fsync per run would
        # cost more than the run's own writes. (The index, written twice per capture, is fsynced.)
        os.replace(partial, self._path(number, ".h5"))
        return self._path(number, ".h5")

    def _check_index(self) -> None:
        """The index must still be this capture's: one removed (with its folder) or replaced by another capture
        (``mode="w"`` with ``locking=False``) is one error, not runs written where nothing reads them or into the
        other capture. A stat per call; the index is read again only when it changed (another appending writer)."""
        if not self.capture_id or not self._index_first:  # no index yet (merge writes its index last)
            return
        name = os.path.basename(self.index_path)
        try:
            stat = os.stat(self.index_path)
        except FileNotFoundError:
            raise CaptureWriteError(
                f"the capture's index {name} was removed while it recorded, and its runs cannot be read without it; "
                "attach again to record"
            ) from None
        signature = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if signature == self._index_seen:
            return
        current = _capture_id(self.index_path, self.locking)
        if current and current != self.capture_id:
            raise CaptureWriteError(
                f"{name} was replaced by another capture (mode='w') while this one recorded; this run is left "
                "out of it: record to another path"
            )
        if current:
            self._index_seen = signature


def _capture_id(index_path: str, locking: bool | str | None = None) -> str:
    """The index's ``capture_id`` (written into every run file, so a run of another capture is recognised)."""
    try:
        with h5py.File(index_path, "r", **({} if locking is None else {"locking": locking})) as index:
            return schema.as_text(index.attrs.get("capture_id")) or ""
    except OSError:
        return ""


# ---- the writer lock -------------------------------------------------------------------------------------------------
# A capture holds a shared flock on its run folder's LOCK_FILE from attach to close: mode="w" (which removes the runs)
# is refused while any capture writes there, in this process too (a flock belongs to the open file, not the process).
# Taking it, that check and the file's removal happen under the index lock, so none races another. locking=False
# skips it, as HDF5's own locking is skipped; RunFiles._check_index is the second line of defence.


class WriterLock:
    """One capture's shared flock on its run folder's lock file: an open descriptor, closed to let go, also when the
    object is dropped (an attach that failed after the index was made). A forked child closes only its own copy."""

    def __init__(self, fd: int):
        self.release = weakref.finalize(self, os.close, fd)  # calling it closes the descriptor, once


def refuse_if_written(index_path: str, locking) -> None:
    """A one-line CaptureFileError when a capture writes ``index_path`` now (for ``mode="w"``, which would remove
    its runs under it). Nothing is written here."""
    if locking is False or fcntl is None:
        return
    try:
        fd = _open_lock(index_path, os.O_RDONLY)
    except OSError:
        return  # no lock file: no capture writes here
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        holders = _holders(fd)
    except OSError:
        return  # locks do not work here: taking the capture's own lock says so (or goes on, best-effort)
    finally:
        os.close(fd)
    who = f" (process {holders}?)" if holders else ""
    raise CaptureFileError(
        f"{index_path} is being written by another capture{who}; wait for it to close or choose another path"
    )


def hold_writer_lock(index_path: str, locking) -> WriterLock | None:
    """Take the shared writer lock for the capture being attached (under the index lock), held until its
    ``release()``. None where locks are skipped (or fail, with ``locking="best-effort"``)."""
    if locking is False or fcntl is None:
        return None
    path = os.path.join(runs_dir(index_path), LOCK_FILE)
    try:
        fd = _open_lock(index_path, os.O_RDWR | os.O_CREAT)
    except PermissionError:  # made by another user: a read-only descriptor takes a shared lock as well
        fd = _open_lock(index_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as exc:
        os.close(fd)
        if locking == "best-effort":
            return None
        raise CaptureFileError(
            f"cannot lock {path} ({first_line(exc)}); on a network file system pass locking=False"
        ) from None
    return WriterLock(fd)


def remove_lock_file(index_path: str, locking) -> None:
    """Remove the lock file once no capture holds it (under the index lock, so no capture is taking it now)."""
    if locking is False or fcntl is None:
        return
    path = os.path.join(runs_dir(index_path), LOCK_FILE)
    try:
        fd = _open_lock(index_path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.remove(path)
    except OSError:
        pass  # held by a capture still writing (or locks do not work here): it stays, ignored by readers
    finally:
        os.close(fd)


def _open_lock(index_path: str, flags: int) -> int:
    """The lock file, never through a link nor blocking on a FIFO planted under its name."""
    flags |= getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.open(os.path.join(runs_dir(index_path), LOCK_FILE), flags, 0o666)


def _holders(fd: int) -> str:
    """The processes holding a flock on ``fd``'s file, where the system lists them (Linux), else ""."""
    inode = str(os.fstat(fd).st_ino)
    try:
        with open("/proc/locks") as listing:
            rows = [line.split() for line in listing]
    except OSError:
        return ""
    pids = [row[4] for row in rows if len(row) > 5 and row[1] == "FLOCK" and row[5].rsplit(":", 1)[-1] == inode]
    return ", ".join(dict.fromkeys(pids))
