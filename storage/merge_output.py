"""Putting a merged capture in place: written whole beside the old one, then swapped in by renames (no torch).

The new capture is written under names of its own, ``OUT.new-PID-HEX`` and its run folder ``OUT.new-PID-HEX.runs``
(itself a readable capture), while what is at ``OUT`` stays as it was: a failure there, a full disk say, leaves the
old capture untouched and nothing of the new one. Then four renames (which need no disk space) swap them:

    OUT -> OUT.old-ID,  OUT.runs -> OUT.old-ID.runs,  OUT.new-ID.runs -> OUT.runs,  OUT.new-ID -> OUT

From the first rename on no index is at ``OUT`` until the last, so a reader finds no capture there, never an index
beside the other capture's runs, whenever the merge is killed. An error or an interrupt in the swap renames back what
was moved; where that fails too, every piece stays where it is and one line says how to put the old capture back.
A later merge into ``OUT`` removes what a killed merge left of a new capture, and old pieces only once the swap
provably completed (``OUT`` and its runs one capture); else it names them and stops. ``OUT.merge.lock`` keeps two
merges into one ``OUT`` from running at once. The index is made in memory, as ``index.py`` makes a capture's: HDF5
writing it to disk itself can fail inside its flush, where the error comes out as a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import TypeVar

try:
    import fcntl
except ImportError:  # not POSIX: no merge lock
    fcntl = None  # type: ignore[assignment]

import h5py

from ..errors import MergeError, disk_full, first_line, os_reason
from . import run_files, safety, schema

Written = TypeVar("Written")  # what the caller's run writer reports back (merge: the bytes mapped)

LOCK_SUFFIX = ".merge.lock"
_PIECE = r"\.(new|old)-(\d+)-([0-9a-f]{8})(\.runs)?"


def write_capture(
    out: str,
    write_runs: Callable[[str, str], tuple[list[int], Written]],
    index_image: Callable[[str, list[int]], bytes],
) -> Written:
    """``write_runs(index, capture_id)`` writes the run files as those of the capture indexed at ``index`` (beside
    ``out``) and returns their numbers and what this returns; ``index_image(capture_id, numbers)`` gives the index's
    bytes. The capture id
    is a new one: the merged capture's run files are recognised as its own (``safety.foreign_run``). Call it holding
    :func:`exclusive`, after :func:`clear_leftovers`."""
    capture_id = uuid.uuid4().hex
    token = f"{os.getpid()}-{capture_id[:8]}"  # a leftover old piece is removed once this capture is in place
    new, old = f"{out}.new-{token}", f"{out}.old-{token}"
    done: list[tuple[str, str]] = []  # the swap's renames made so far
    try:
        os.mkdir(run_files.runs_dir(new))
        numbers, written = write_runs(new, capture_id)
        image = index_image(capture_id, numbers)
        with open(new, "wb") as index:
            index.write(image)
            index.flush()
            os.fsync(index.fileno())
        for source, target in (
            (out, old),
            (run_files.runs_dir(out), run_files.runs_dir(old)),
            (run_files.runs_dir(new), run_files.runs_dir(out)),
            (new, out),
        ):
            if os.path.lexists(source):  # no old capture (or only its index, or only its runs): nothing to move
                done.append((source, target))  # before: an interrupt may come after the rename, not before it
                os.rename(source, target)
    except BaseException as exc:
        _undo(out, new, old, done)
        if isinstance(exc, (OSError, RuntimeError)):  # h5py says RuntimeError when HDF5's flush meets a full disk
            reason = os_reason(exc) or first_line(exc)
            hint = "free some space" if disk_full(exc) else "check the path and its folder"
            raise MergeError(f"cannot write {out} ({reason}); {hint}") from None
        raise
    _remove_old(out, old)
    return written


def _undo(out: str, new: str, old: str, done: list[tuple[str, str]]) -> None:
    """Rename back what the swap moved, then remove the new capture; where a rename back fails, a one-line
    MergeError naming what is where (nothing is removed then: each capture may have no other copy)."""
    try:
        for source, target in reversed(done):
            if os.path.lexists(target) and not os.path.lexists(source):
                os.rename(target, source)
    except BaseException as exc:
        raise MergeError(
            f"merging into {out} was interrupted and could not be undone ({first_line(exc)}): "
            f"{restore_advice(out, _token(out, old))}"
        ) from None
    with contextlib.suppress(OSError):
        os.remove(new)
    shutil.rmtree(run_files.runs_dir(new), ignore_errors=True)  # made here, holding nothing but ours


def _remove_old(out: str, old: str) -> None:
    """The replaced capture, once the new one is in place: its index, then its run folder; a file there that is no
    run file (someone's notes) moves to the new run folder, as it stayed in place before merges swapped folders."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(old)
    folder = run_files.runs_dir(old)
    if os.path.islink(folder):  # a link to a folder elsewhere: the old runs there go, the folder stays
        for path, _ in run_files.list_run_files(old).values():
            with contextlib.suppress(OSError):
                os.remove(path)
        os.remove(folder)
        return
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        keep = run_files.run_file_name(name) is None and name != run_files.LOCK_FILE
        if keep and not name.startswith(".merging-"):  # .merging-*: staging left by older versions' merges
            with contextlib.suppress(OSError):
                if not os.path.lexists(os.path.join(run_files.runs_dir(out), name)):
                    os.rename(os.path.join(folder, name), os.path.join(run_files.runs_dir(out), name))
    shutil.rmtree(folder, ignore_errors=True)


# ---- one merge at a time ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exclusive(out: str, locking) -> Iterator[None]:
    """An exclusive flock on ``OUT.merge.lock`` for the whole merge: a second merge into ``out`` meanwhile is a
    one-line MergeError. The file is removed at the end while still held; a merge that opened it before then finds
    it gone (another inode at the path) and takes the new one."""
    if fcntl is None:
        yield
        return
    path = out + LOCK_SUFFIX
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise MergeError(f"cannot write {out} ({os_reason(exc) or first_line(exc)}); check the path") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MergeError(f"another merge is writing {out}; wait for it to finish") from None
        except OSError as exc:
            os.close(fd)
            if locking is False or locking == "best-effort":
                yield
                return
            raise MergeError(
                f"cannot lock {path} ({first_line(exc)}); on a network file system pass locking=False"
            ) from None
        try:
            here = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            here = None
        held = os.fstat(fd)
        if here is not None and (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # removed by the merge that held it as we opened it: take the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


# ---- what a killed merge left ----------------------------------------------------------------------------------------
def leftovers(out: str) -> dict[str, list[str]]:
    """{swap id: paths} of what merges into ``out`` left beside it (``OUT.new-ID``, ``OUT.old-ID`` and their run
    folders), each list in the order new, new runs, old, old runs."""
    folder = os.path.dirname(os.path.abspath(out))
    pattern = re.compile(re.escape(os.path.basename(out)) + _PIECE + "$")
    found: dict[str, list[str]] = {}
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in sorted(names):
        match = pattern.match(name)
        if match is not None:
            found.setdefault(f"{match.group(2)}-{match.group(3)}", []).append(os.path.join(os.path.dirname(out), name))
    return {token: sorted(paths, key=lambda p: (".old-" in p, p)) for token, paths in found.items()}


def clear_leftovers(out: str) -> None:
    """Before a merge into ``out`` (holding :func:`exclusive`): remove what killed merges left of their new capture,
    and their old pieces where the swap provably completed; old pieces of a swap cut short are one MergeError
    saying how to restore them (they may be the only copy of the capture that was at ``out``)."""
    for token, paths in leftovers(out).items():
        pid = int(token.split("-")[0])
        if any(f".old-{token}" in p for p in paths):
            if any(f".new-{token}" in p for p in paths) or not _swap_completed(out, f"{out}.old-{token}"):
                raise MergeError(f"a merge into {out} was cut short: {restore_advice(out, token)}")
        elif pid != os.getpid() and _alive(pid):
            continue  # a merge still writing (one that took no lock): not ours to touch
        for path in paths:
            _remove(path)


def cut_short(out: str) -> str | None:
    """A line on what a merge into ``out`` cut short in its swap left beside it (for ``info``), else None."""
    for token, paths in leftovers(out).items():
        if any(f".old-{token}" in p for p in paths):
            return f"was cut short: {restore_advice(out, token)}"
    return None


def restore_advice(out: str, token: str) -> str:
    """What is left where, and the commands that put the old capture back (nothing is guessed or removed)."""
    new, old = f"{out}.new-{token}", f"{out}.old-{token}"
    new_runs, old_runs, runs = run_files.runs_dir(new), run_files.runs_dir(old), run_files.runs_dir(out)
    pieces = [p for p in (new, new_runs, old, old_runs) if os.path.lexists(p)]
    steps = []
    if os.path.lexists(old) and os.path.lexists(out):  # the new index first: never beside the other's runs
        steps.append(f"mv {out} {new}" if not os.path.lexists(new) else f"move {out} aside")
    if os.path.lexists(old_runs):
        if os.path.lexists(runs):
            steps.append(f"mv {runs} {new_runs}" if not os.path.lexists(new_runs) else f"move {runs} aside")
        steps.append(f"mv {old_runs} {runs}")
    if os.path.lexists(old):
        steps.append(f"mv {old} {out}")
    left = ", ".join(pieces) or "nothing"
    restore = f"; to restore the old capture: {'; '.join(steps)}" if steps else ""
    return safety.clean(f"{left} left beside it{restore}; then remove the .new-{token} pieces and merge again")


def _swap_completed(out: str, old: str) -> bool:
    """Whether ``out`` and its run folder are one capture, a new one: the index has a capture id, every run file
    carries it, and the old index (where still there) has another."""
    new_id = run_files._capture_id(out) if safety.file_problem(out) is None else ""
    if not new_id or not os.path.isdir(run_files.runs_dir(out)) or os.path.islink(run_files.runs_dir(out)):
        return False
    if not new_id.startswith(_token(out, old).split("-")[1]) or run_files._capture_id(old) == new_id:
        return False  # the swap's id is the start of the capture id it put in place
    try:
        for path, _ in run_files.list_run_files(out).values():
            if safety.file_problem(path) is not None:
                return False
            with h5py.File(path, "r") as run:
                if schema.as_text(run.attrs.get("capture_id")) != new_id:
                    return False
    except Exception:  # unreadable: not provably the new capture
        return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def _token(out: str, old: str) -> str:
    return old[len(out) + len(".old-") :]
