"""How a capture ends: :class:`Ending` (what closing does once the hooks are off) and a capture dropped unclosed.

A capture's hooks hold the capture, so it lives as long as its model. A model dropped with its handle unclosed
(both local to a function) is collected with the capture; the runs its writer still had queued must be kept and
linked all the same. Holding every open capture strongly until close() would keep each such model, its host
buffers and its writer thread alive until the process ends; so instead a finalizer on the capture hands its
:class:`Ending`, which reaches neither the capture nor the model, to one closing thread that finishes it. The
finalizer only puts it on a ``SimpleQueue`` (reentrant, made for weakref callbacks): the garbage collector may run
it on any thread, the capture's own writer thread included, where waiting for that writer would never return.
At exit the closing thread is waited for (``finish_dropped``).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import weakref

from ..errors import CaptureWriteError, first_line
from ..storage import index
from ..storage.write.buffers import HostBufferPool
from ..storage.write.writer import CaptureWriter


class Ending:
    """The writer, its pool and the index of one capture: closing them links every completed run into the index."""

    def __init__(self, writer: CaptureWriter, pool: HostBufferPool, path: str, locking, lock):
        self.writer = writer
        self.pool = pool
        self.path = path
        self.locking = locking
        self.lock = lock
        self.pid = os.getpid()  # a forked child's copy is not finished there (the parent's files)
        self.done = False

    def finish(self, orphans: int) -> CaptureWriteError | None:
        """Wait for every queued write, then link the runs and store the statistics; the link failure, if any."""
        self.writer.close()  # waits for every queued write; again where a first wait was interrupted
        self.pool.close()
        stats = self.pool.stats
        failed: CaptureWriteError | None = None
        try:
            index.finish_index(
                self.path,
                {
                    "buffer_peak_bytes": stats.peak_bytes,
                    "staging_peak_bytes": self.writer.staging.peak,  # partial chunks the writer assembled
                    "backpressure_waits": stats.waits,
                    "backpressure_seconds": stats.wait_seconds,
                    "orphan_loop_calls": orphans,
                },
                locking=self.locking,
                lock=self.lock,
            )
        except CaptureWriteError as exc:  # linking again would fail alike: the runs are kept, the error said once
            failed = exc
        self.done = True  # not before: a close cut short (Ctrl-C) is finished by the next
        return failed


_dropped: queue.SimpleQueue[Ending | None] = queue.SimpleQueue()
_closer: threading.Thread | None = None


def finish_when_dropped(capture: object, ending: Ending) -> weakref.finalize:
    """Finish ``ending`` on the closing thread once ``capture`` is collected unclosed (detach it at close())."""
    global _closer
    if _closer is None or not _closer.is_alive():  # first capture, or a forked child (which has no threads)
        _closer = threading.Thread(target=_close_dropped, name="loopscope-close", daemon=True)
        _closer.start()
    finalizer = weakref.finalize(capture, _dropped.put, ending)
    finalizer.atexit = False  # open captures are closed at exit by capture.py, dropped ones by finish_dropped
    return finalizer


def _close_dropped() -> None:
    while (ending := _dropped.get()) is not None:
        _finish_quietly(ending)


def _finish_quietly(ending: Ending) -> None:
    if ending.done or ending.pid != os.getpid():
        return
    try:  # orphan loop calls were counted by the tracker, gone with the model: not known here
        failed = ending.finish(orphans=0)
        ending.writer.raise_if_failed()
        if failed is not None:
            raise failed
    except BaseException as exc:  # nobody to raise it to: say it
        print(f"loopscope: closing the dropped capture {ending.path} failed: {first_line(exc)}", file=sys.stderr)


def finish_dropped() -> None:
    """At exit: let the closing thread finish what it has, then finish any capture dropped since."""
    if _closer is not None and _closer.is_alive():
        _dropped.put(None)
        _closer.join()
    while True:
        try:
            ending = _dropped.get_nowait()
        except queue.Empty:
            return
        if ending is not None:
            _finish_quietly(ending)
