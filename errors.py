"""The exceptions loopscope raises on purpose.

Every error a user can cause (a bad file, a model without a loop, a full disk) is one of these, with a message
that fits on one line and says what to do. The CLI prints ``str(error)`` and exits non-zero instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import re


class LoopscopeError(Exception):
    """Base class: anything loopscope raises deliberately."""


class CaptureFileError(LoopscopeError):
    """A file is missing, is not a loopscope capture, is damaged, or has a newer format version."""


class LoopNotFoundError(LoopscopeError):
    """No recurrent block could be found in the model (or the ``loop=`` path is wrong)."""


class CaptureWriteError(LoopscopeError):
    """Writing the capture failed (disk full, permissions); the hooks were removed and earlier runs kept."""

    #: The OS or HDF5 error behind it, for code that wants it (not chained, so a user sees one traceback).
    original: BaseException | None = None


class MergeError(LoopscopeError):
    """Captures cannot be merged: they differ (loops, hidden size, dtype, model), a source is missing or damaged,
    or the output already exists."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (HDF5's span many), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_HDF5_REASON = re.compile(r"error message = '([^']+)'")  # how HDF5 quotes the OS's reason inside its messages


def os_reason(exc: BaseException) -> str | None:
    """The operating system's reason for a failed file operation ("No space left on device"): an OSError's own, or
    the one HDF5 buries in its long messages (``error message = '...'``); None when there is none."""
    found = _HDF5_REASON.search(str(exc))
    if found:
        return found.group(1)
    return getattr(exc, "strerror", None) or None


def hdf5_line(exc: BaseException) -> str:
    """An HDF5 error on one line: its first line, without the write details, and the OS reason it buries."""
    first = first_line(exc).split(" (file write failed")[0]
    reason = _HDF5_REASON.search(str(exc))
    return f"{first} ({reason.group(1)})" if reason else first


def disk_full(exc: BaseException | None) -> bool:
    """Whether a write failed for want of space (a full disk or quota), said by errno or in HDF5's text."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return exc is not None and os_reason(exc) in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
