"""Room for a batch's run files: all of a call's runs are open at once, one file (one descriptor) per batch row.

A batch past the process's open-file limit (``ulimit -n``, often 1024) would fail at its files' creation and lose
every run of the call. So before a call's runs open, :func:`make_room` raises the soft limit ``RLIMIT_NOFILE``
toward the hard one where the batch needs it (the soft limit is the process's own to raise; Python's test suite
and most servers do the same), and where even the hard limit is too low refuses in one line, before the forward.
"""

from __future__ import annotations

import os

from ...errors import LoopscopeError

try:
    import resource
except ImportError:  # Windows: no such limit to raise
    resource = None  # type: ignore[assignment]

SMALL_BATCH = 64  # no count of open files below this many rows: one file each fits any usual limit
MARGIN = 64  # descriptors kept free beside the run files: the index, its lock, reading and the user's own


def make_room(batch: int) -> None:
    """Make sure ``batch`` more files can be open at once (once per call, not per forward of a generate())."""
    if batch <= SMALL_BATCH or resource is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    need = _open_descriptors() + batch + MARGIN
    if need <= soft:
        return
    if raise_soft_limit(max(need, 2 * soft)) >= need:  # toward the hard limit, with room for the next batches
        return
    raise LoopscopeError(
        f"a batch of {batch} rows records {batch} run files open at once, more than this process may open "
        f"(ulimit -n is {soft}, at most {hard}); raise it (ulimit -n {need}) or record a smaller batch"
    )


def raise_soft_limit(want: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``want`` (at most the hard limit) if it is lower; the soft limit after.
    The reader (``storage/open_runs.py``) shares it: the more run files may stay open, the fewer are closed."""
    if resource is None:
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return want if soft == resource.RLIM_INFINITY else soft
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        except (ValueError, OSError):
            pass
    return soft


def _open_descriptors() -> int:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0
