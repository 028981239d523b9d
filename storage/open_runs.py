"""How many run files stay open at once, for every capture this process reads (no torch).

Each run is its own HDF5 file, and a capture (or the many rank files a merge reads) can hold more runs than the
process may have files open (``ulimit -n``: 1024 by default on Linux). So a run's file is opened when the run is
used and kept open for the next use, but at most :func:`limit` of them at a time: opening one more closes the least
recently used, which opens again, transparently, when its run is used again (``Run.use``). The first time the limit
is reached, the soft open-file limit is raised toward the hard one (``write/descriptors.py``), so closing is rare.

A run in use is never closed: ``pin`` holds it open (``Run.use`` around each access to its h5py objects, a dataset
that ``Run.dataset`` handed out for as long as that object lives), and closing skips pinned runs, letting the open
files exceed the limit for a while rather than closing a file a thread is reading. All of it under one lock.
"""

from __future__ import annotations

import collections
import errno
import os
import threading
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

import h5py

from .write.descriptors import MARGIN, raise_soft_limit

try:
    import resource
except ImportError:  # not POSIX: no limit to read, the ceiling below applies
    resource = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .run import Run

#: Open run files at most, whatever the limit (each holds HDF5's chunk cache while open).
MAX_OPEN = 1024
#: A merged run also holds its source files open while it reads: run files get half the descriptors left after a
#: margin (the index, the Python process's own files and the caller's).
SHARE = 2

lock = threading.RLock()  # every open, close and pin of a run file
# id(run) -> a weak reference, least recently used first: a run dropped unclosed lets its file go as before
_open: OrderedDict[int, weakref.ref] = OrderedDict()
# pins to drop, from finalizers (which may run anywhere, even in a thread holding h5py's lock: they never wait here)
_unpin_later: collections.deque = collections.deque()
_raised = False  # the soft limit was raised once already (or there was no need)


def limit() -> int:
    """Run files kept open at most, from the process's open-file limit now (it may be changed at any time)."""
    if resource is None:
        return MAX_OPEN
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN
    margin = min(MARGIN, soft // 4)
    return max(2, min(MAX_OPEN, (soft - margin) // SHARE))


def pin(run: Run) -> h5py.File:
    """``run``'s open file (opened here if closed), held open until :func:`unpin`; it is now the most recently used."""
    with lock:
        _drain()
        run._pins += 1
        try:
            group = run._group
            if group is None:
                group = run._open()  # under the lock: two threads never both open the same run
            elif id(run) in _open:
                _open.move_to_end(id(run))
            return group
        except BaseException:
            run._pins -= 1
            raise


def unpin(run: Run) -> None:
    with lock:
        run._pins -= 1


def unpin_later(run: Run) -> None:
    """:func:`unpin` from a finalizer: done at the next use of any run, without waiting for the lock now."""
    _unpin_later.append(run)


def _drain() -> None:
    while _unpin_later:
        _unpin_later.popleft()._pins -= 1


def opening(run: Run) -> None:
    """``run`` is about to open its file (under the lock, from ``pin``): the least recently used others that no one
    is using are closed to make room for it."""
    global _raised
    with lock:
        _drain()
        _open.pop(id(run), None)
        if len(_open) >= limit() and not _raised:
            _raised = True
            raise_soft_limit(SHARE * MAX_OPEN + MARGIN)
        most = limit()
        if len(_open) >= most:
            _close_unused(run, until=most - 1)
        _open[id(run)] = weakref.ref(run)  # dropped unclosed: its file closes with it; its entry goes here


def closed(run: Run) -> None:
    with lock:
        _open.pop(id(run), None)


def close_others(run: Run) -> bool:
    """Close every open run file but ``run``'s and those in use (the process ran out of descriptors anyway); whether
    any was closed."""
    with lock:
        _drain()
        return _close_unused(run, until=0)


def _close_unused(run: Run, until: int) -> bool:
    """Close run files no one uses, least recently used first, but ``run``'s, until ``until`` are left open (or
    none is left to close); drop the entries of runs collected meanwhile. Whether any was closed. Under the lock."""
    closed_any = False
    for key, ref in list(_open.items()):
        if len(_open) <= until:
            break
        other = ref()
        if other is None:
            _open.pop(key, None)
        elif other is not run and other._pins <= 0:
            other.close()
            closed_any = True
    return closed_any


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
