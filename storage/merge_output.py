"""Putting a merged capture in place: written whole first, then renamed over what was at its path (no torch).

``merge --force`` replaces an existing capture. Its run files and index stay until the new ones are complete: the
new run files are written to a staging folder inside the run folder and the index to ``OUT.tmp``; only then are
they renamed into place (renames need no disk space). A failure before that, a full disk say, leaves the old
capture as it was and nothing of the new one. The index is made in memory, as ``index.py`` makes a capture's:
HDF5 writing it to disk itself can fail inside its flush, where the error comes out as a traceback.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable

from ..errors import MergeError, disk_full, first_line, os_reason
from . import run_files, schema


def write_capture(
    out: str,
    write_runs: Callable[[str, str], list[int]],
    index_image: Callable[[str, list[int]], bytes],
) -> None:
    """``write_runs(staging, capture_id)`` writes the run files as those of the capture indexed at ``staging`` and
    returns their numbers; ``index_image(capture_id, numbers)`` gives the index's bytes. The capture id is a new one:
    the merged capture's run files are recognised as its own (``safety.foreign_run``)."""
    folder = run_files.runs_dir(out)
    made_folder = not os.path.lexists(folder)
    # Inside the run folder: the same file system, so the final renames cannot fail for want of space or a device.
    staging = os.path.join(folder, f".merging-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp = out + ".tmp"
    try:
        if made_folder:
            os.mkdir(folder)
        os.mkdir(run_files.runs_dir(staging))
        capture_id = uuid.uuid4().hex
        numbers = write_runs(staging, capture_id)
        image = index_image(capture_id, numbers)
        with open(tmp, "wb") as index:
            index.write(image)
            index.flush()
            os.fsync(index.fileno())
        _put_in_place(out, staging, numbers, tmp)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        shutil.rmtree(run_files.runs_dir(staging), ignore_errors=True)  # made here, holding nothing but ours
        if made_folder:  # the run folder this merge made, once empty again (rmdir leaves one that is not)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        if isinstance(exc, (OSError, RuntimeError)):  # h5py says RuntimeError when HDF5's flush meets a full disk
            reason = os_reason(exc) or first_line(exc)
            hint = "free some space" if disk_full(exc) else "check the path and its folder"
            raise MergeError(f"cannot write {out} ({reason}); {hint}") from None
        raise


def _put_in_place(out: str, staging: str, numbers: list[int], tmp: str) -> None:
    """Rename the new run files over the old ones, remove the old runs past them, then rename the index over the
    old one. The staging folder is left empty and removed."""
    folder = run_files.runs_dir(out)
    for number in numbers:
        name = schema.run_name(number) + ".h5"
        os.replace(os.path.join(run_files.runs_dir(staging), name), os.path.join(folder, name))
    for name in os.listdir(folder):  # what is left of the old capture's runs (only with force)
        parsed = run_files.run_file_name(name)
        if parsed is not None and (parsed[0] not in numbers or not parsed[1]):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
    os.replace(tmp, out)
    with contextlib.suppress(OSError):
        os.rmdir(run_files.runs_dir(staging))
