"""How many run files stay open at once, for every capture this process reads (no torch).

Each run is its own HDF5 file, and a capture (or the many rank files a merge reads) can hold more runs than the
process may have files open (``ulimit -n``: 1024 by default on Linux). So a run's file is opened when the run is
used and kept open for the next use, but at most :func:`limit` of them at a time: opening one more closes the least
recently used, which opens again, transparently, when its run is used again (``Run.group``).
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import h5py

try:
    import resource
except ImportError:  # not POSIX: no limit to read, the ceiling below applies
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .run import Run

#: Open run files at most, whatever the limit: a read touches one run (two with a reference run) at a time.
MAX_OPEN = 256
#: A merged run also holds its source file open while it reads (a merge of merges, one per level): an eighth of the
#: descriptors leaves room for those, the index, the Python process's own files and the caller's.
SHARE = 8

_lock = threading.RLock()
# id(run) -> a weak reference, least recently used first: a run dropped unclosed lets its file go as before
_open: OrderedDict[int, weakref.ref] = OrderedDict()


def limit() -> int:
    """Run files kept open at most, from the process's open-file limit now (it may be changed at any time)."""
    if resource is None:
        return MAX_OPEN
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN
    return max(2, min(MAX_OPEN, soft // SHARE))


def opening(run: Run) -> None:
    """``run`` is about to open its file: the least recently used others are closed to make room for it."""
    with _lock:
        _open.pop(id(run), None)
        while len(_open) >= limit():
            key, ref = _open.popitem(last=False)
            oldest = ref()
            if oldest is not None:
                oldest.close()
        _open[id(run)] = weakref.ref(run, functools.partial(_forget, id(run)))


def used(run: Run) -> None:
    """``run``'s open file was used: it is closed last."""
    with _lock:
        if id(run) in _open:
            _open.move_to_end(id(run))


def closed(run: Run) -> None:
    with _lock:
        _open.pop(id(run), None)


def _forget(key: int, ref: weakref.ref) -> None:
    """A run was dropped without being closed (its file closes with it)."""
    with _lock:
        if _open.get(key) is ref:
            del _open[key]


def close_others(run: Run) -> bool:
    """Close every open run file but ``run``'s (the process ran out of descriptors anyway); whether any was open."""
    with _lock:
        others = [(key, ref) for key, ref in _open.items() if key != id(run)]
        for key, ref in others:
            _open.pop(key, None)
            other = ref()
            if other is not None:
                other.close()
    return bool(others)


def out_of_descriptors(exc: BaseException) -> bool:
    """Whether opening a file failed because the process (or the system) has too many files open."""
    if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
        return True
    return any(os.strerror(code) in str(exc) for code in (errno.EMFILE, errno.ENFILE))


def signature(file: h5py.File, path: str) -> tuple[int, ...] | None:
    """What tells that the run file open as ``file`` is not the one checked before (device, inode, size, times), or
    None if unknown: the checks of its first open are not repeated for the same file."""
    try:
        fd = int(file.id.get_vfd_handle())
    except Exception:  # a driver without a descriptor: the path is stat'ed instead
        fd = None
    try:
        info = os.fstat(fd) if fd is not None else os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
