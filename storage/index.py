"""The index file of a capture: created (or checked, when appending) at attach, finished at a clean close.

The index holds the header (format, versions, model, config, loop adapter, options) and the readout norm; at a
clean close it also gets external links to the completed runs (see ``run_files.py`` for the folder itself). It is
only ever edited as a copy renamed over it, under a lock on the run folder, so a kill leaves the old index and two
writers appending at once keep each other's links.
"""

from __future__ import annotations

import contextlib
import errno
import io
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

from ..errors import CaptureFileError, CaptureWriteError, disk_full, first_line, os_reason
from . import checksum, run_files, schema
from .reader import CaptureFile
from .readout import ReadoutNorm
from .run_files import check_locking, list_run_files, runs_dir

MODES = ("w-", "x", "w", "a")


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
    if mode == "w":  # it would remove the runs of a capture writing there now
        run_files.refuse_if_written(path, locking)
    if exists and mode == "a":
        CaptureFile(path, locking=locking).close()  # validates that it is a capture we can extend
    return exists


def create_index(
    path: str | os.PathLike,
    mode: str = "w-",
    *,
    header: dict[str, Any],
    readout: dict[str, Any] | None,
    locking: bool | str | None = None,
) -> run_files.WriterLock | None:
    """Create (or, with mode "a", validate) the index file; returns the capture's writer lock (``run_files``), held
    until it is passed to :func:`finish_index` (or released), or None where locks are skipped.

    ``mode`` follows h5py: "w-"/"x" (default) refuse an existing capture, "w" replaces it (its run files too),
    "a" adds runs to an existing loopscope capture. ``locking`` is passed to h5py (False on network file systems
    whose locks fail).
    """
    path = os.fspath(path)
    check_target(path, mode, locking)  # refuse early, before anything is made
    try:
        os.makedirs(runs_dir(path), exist_ok=True)  # also when appending to an empty capture whose folder was lost
        with _index_lock(path, locking):  # checked again under the lock: another writer may have just made it
            exists = check_target(path, mode, locking)  # mode="w": refused while another capture writes here
            lock = run_files.hold_writer_lock(path, locking)  # held until close: mode="w" elsewhere is refused
            try:
                if exists and mode == "a":
                    _check_same_model(path, header, readout, locking)
                    return lock
                if mode == "w":
                    for run_path, _ in list_run_files(path).values():
                        os.remove(run_path)
                with _replaced_atomically(path, start_from=None) as index:
                    _write_header(index, {**header, "capture_id": uuid.uuid4().hex})
                    _write_readout(index, readout)
            except BaseException:
                if lock is not None:
                    lock.release()
                if not os.path.exists(path):
                    run_files.remove_lock_file(path, locking)
                raise
    except (OSError, RuntimeError) as exc:
        if not os.path.exists(path):  # the folder made above, still empty: nothing of a capture is left behind
            with contextlib.suppress(OSError):
                os.rmdir(runs_dir(path))
        reason = os_reason(exc) or first_line(exc)
        raise CaptureFileError(f"cannot create {path} ({reason}); {_create_hint(exc, reason)}") from None
    return lock


def _create_hint(exc: BaseException, reason: str) -> str:
    """What to do about a failed attach, by the OS's reason: a network file system's lock failure alone gets the
    locking=False advice."""
    code = getattr(exc, "errno", None)
    if disk_full(exc):
        return "free some space"
    if code in (errno.EACCES, errno.EPERM) or reason in (os.strerror(errno.EACCES), os.strerror(errno.EPERM)):
        return "choose a folder you can write"
    if code == errno.EROFS or reason == os.strerror(errno.EROFS):
        return "the file system is read-only; choose another path"
    if code == errno.ENOLCK or any(word in str(exc).lower() for word in ("unable to lock", "file locking")):
        return "on a network file system try locking=False"
    return "check the path and its folder"


def _check_same_model(path: str, header: dict[str, Any], readout: dict[str, Any] | None, locking) -> None:
    """Runs added to a capture must come from the model it describes: analysis reads every run out through the
    one readout norm the index stores, and a run of another model would be measured in the wrong space."""
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


def finish_index(
    path: str, attrs: dict[str, Any], locking: bool | str | None = None, lock: run_files.WriterLock | None = None
) -> None:
    """At a clean close: link every completed run into the index (so plain h5py sees them) and store stats.
    Under the folder lock the copy starts from the newest index, so a writer appending at the same time keeps its
    links. A failure (a full disk) is a CaptureWriteError: the runs stay in the folder, where the reader finds them.

    The index is edited as a copy that replaces it atomically: a kill in the middle leaves the old index, which
    still finds every run through the run directory. The capture's writer ``lock`` (from :func:`create_index`) is
    let go of here, and the lock file removed once no capture holds it.
    """
    try:
        with _index_lock(path, locking):
            try:
                if not os.path.exists(path):
                    raise FileNotFoundError(errno.ENOENT, "the index was removed")
                with _replaced_atomically(path, start_from=path) as index:
                    runs = index.require_group(schema.RUNS)
                    for number, (run_path, complete) in list_run_files(path).items():
                        name = schema.run_name(number)
                        if complete and name not in runs:
                            relative = os.path.relpath(run_path, os.path.dirname(os.path.abspath(path)))
                            runs[name] = h5py.ExternalLink(relative, "/")
                    index.attrs.update(schema.attrs_to_store(attrs))
            finally:
                if lock is not None:
                    lock.release()
                run_files.remove_lock_file(path, locking)  # once no capture holds it: a closed capture has none
    except (OSError, RuntimeError) as exc:  # h5py raises RuntimeError when HDF5's flush fails (a full disk)
        if not os.path.exists(path):  # not "reads as usual": nothing opens the runs without their index
            raise CaptureWriteError(
                f"the index {path} was removed while the capture recorded; its runs cannot be read without it: "
                "record again"
            ) from None
        if not os.path.isdir(runs_dir(path)):
            raise CaptureWriteError(
                f"the run folder {runs_dir(path)} was removed while the capture recorded, its runs with it; "
                "record again"
            ) from None
        reason = os_reason(exc) or first_line(exc)
        raise CaptureWriteError(
            f"could not link the runs into {path} ({reason}); every completed run is kept in {runs_dir(path)} and "
            "reads as usual"
        ) from None
    finally:
        if lock is not None:
            lock.release()  # where the index lock could not be taken


@contextlib.contextmanager
def _replaced_atomically(path: str, *, start_from: str | None):
    """Yield an h5py file (a copy of ``start_from``, or empty) that is written to ``path + ".tmp"``, flushed to
    disk and renamed over ``path`` on success; on failure ``path`` is untouched and the temporary file removed.

    HDF5 edits the index in memory and the bytes are written by Python: when HDF5 itself meets a full disk it can
    fail inside an object's release, where no error can be caught, and leave the file half-closed (the process then
    crashed). Written here, a full disk is one OSError. An index is small (a header, the readout norm, links)."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # per writer: two never share one
    image = io.BytesIO()
    if start_from is not None:
        with open(start_from, "rb") as source:
            shutil.copyfileobj(source, image)
    with h5py.File(image, "r+" if start_from else "w", libver=schema.LIBVER) as index:
        yield index
    try:
        with open(tmp, "wb") as out:
            out.write(image.getbuffer())
            out.flush()
            os.fsync(out.fileno())
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
        else:
            _remove_stale_copies(path)
        yield
    finally:
        os.close(fd)


def _remove_stale_copies(path: str) -> None:
    """Temporary index copies left by a writer killed while it replaced the index. Only called under the lock,
    inside which every copy is made and renamed: one found there belongs to no living writer."""
    folder, name = os.path.split(os.path.abspath(path))
    stale = re.compile(re.escape(name) + r"\.\d+\.[0-9a-f]{8}\.tmp")
    with contextlib.suppress(OSError):
        for entry in os.listdir(folder):
            if stale.fullmatch(entry):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, entry))


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
