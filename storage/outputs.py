"""Writing what loopscope makes from a capture (a figure, a page, a table, an export) so that it appears whole or not
at all, and never through a link: a link at the output may point at the capture itself.
"""

from __future__ import annotations

import os

import h5py

from ..errors import LoopscopeError
from . import safety


def write_whole(out: str | os.PathLike, write):
    """``write(partial)`` to ``out + ".partial"``, then renamed over ``out``; returns what ``write`` returns. The
    file appears whole or not at all, and a link at ``out`` is replaced, never written through. A directory there,
    or an HDF5 file (a capture or run file: loopscope never writes figures, pages or tables as HDF5, even through
    a link), is refused, and an OSError is one LoopscopeError line (the partial file removed)."""
    out = os.fspath(out)
    partial = out + ".partial"
    for path in (out, partial):
        name = "it" if path == out else safety.clean(path)
        if os.path.isdir(path) and not os.path.islink(path):
            raise LoopscopeError(f"cannot write {safety.clean(out)}: {name} is a directory; choose another name")
        if os.path.isfile(path) and h5py.is_hdf5(path):
            raise LoopscopeError(
                f"cannot write {safety.clean(out)}: {name} holds HDF5 data (a capture?), which writing there would "
                "destroy; choose another name"
            )
    try:
        if os.path.lexists(partial):
            os.unlink(partial)  # left by a run that was killed, or a link: never written through
        result = write(partial)
        os.replace(partial, out)
    except BaseException as exc:
        try:
            os.unlink(partial)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise LoopscopeError(f"cannot write {safety.clean(out)}: {safety.clean(exc.strerror or exc)}") from None
        raise
    return result
