"""One thread's calls are recorded at a time: the bookkeeping of a forward (its tokens, steps, staged states) belongs
to one call, so a forward that another thread runs while one is being recorded is left out, counted, and named at
close. The model's own computation is untouched either way.

Costs: :meth:`ThreadGate.claim` where a call begins (a thread-local flag read, a lock tried when none is held); a
step hook reads ``others`` and only while another thread's forward runs reads the flag. The flag is a thread-local
attribute rather than a thread id: ``torch.compile`` traces it, where it warns about the builtin ``get_ident``.
"""

from __future__ import annotations

import threading
import warnings

from .user_frames import user_stacklevel


class _ThisThread(threading.local):
    owns = False  # this thread's call is the one being recorded
    unrecorded = 0  # depth of this thread's calls running unrecorded (their nested calls are not recorded either)


class ThreadGate:
    """Which thread's call is being recorded (``this_thread.owns`` on that thread, read by the hooks), and the
    forwards of other threads left out meanwhile."""

    def __init__(self) -> None:
        self.this_thread = _ThisThread()
        self.others = 0  # unrecorded calls running now (step hooks then check which thread they run on)
        self.skipped = 0  # forwards left out because another thread's call was being recorded
        self._held = threading.Lock()  # held by the thread whose call is being recorded: claiming it is atomic
        self._count = threading.Lock()  # guards others and skipped (changed by the unrecorded threads only)
        self._warned = False

    def claim(self) -> bool:
        """Whether the calling thread's call may be recorded: it is already, or is from now on."""
        this = self.this_thread
        if this.owns:
            return True
        if this.unrecorded or not self._held.acquire(blocking=False):  # inside an unrecorded call, or another
            return False  # thread's call is being recorded
        this.owns = True
        return True

    def release(self) -> None:
        """The calling thread's recorded call has ended: the next call of any thread may be recorded."""
        if self.this_thread.owns:
            self.this_thread.owns = False
            self._held.release()

    def unrecorded(self, original, args, kwargs, *, forward: bool):
        """Run ``original`` untouched while another thread's call is recorded; a forward counts as skipped."""
        this = self.this_thread
        with self._count:
            self.others += 1
            self.skipped += forward
        this.unrecorded += 1
        try:
            return original(*args, **kwargs)
        finally:
            this.unrecorded -= 1
            with self._count:
                self.others -= 1

    def warn_skipped(self) -> None:
        """Name the forwards left out, once (at close)."""
        if self.skipped and not self._warned:
            self._warned = True
            warnings.warn(
                f"loopscope: {self.skipped} forward(s) ran on another thread while one was being recorded and were "
                "not recorded; run the model from one thread at a time to record every forward",
                stacklevel=user_stacklevel(),
            )
