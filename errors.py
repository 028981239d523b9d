"""The exceptions loopscope raises on purpose.

Every error a user can cause (a bad file, a model without a loop, a full disk) is one of these, with a message
that fits on one line and says what to do. The CLI prints ``str(error)`` and exits non-zero instead of a traceback.
"""

from __future__ import annotations


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
