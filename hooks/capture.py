"""``attach()`` and the :class:`Capture` handle: the front that wires the parts of a capture together.

The parts, each in its own module:

* ``detect.py`` and ``families/``: where the model's loop is (a :class:`LoopAdapter`);
* ``install.py``: the hooks and method wrappers on the model, and removing them;
* ``tracking.py``: what each call means (runs, forwards, steps), turned into writer messages;
* ``recorder.py`` and ``transfer.py``: states into host slabs, off whatever device they live on;
* ``storage/write/``: the writer thread that lays messages out in the run files; ``storage/index.py``: the index.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import sys
import warnings
import weakref
from typing import Any, NoReturn

from torch import nn

from ..errors import CaptureWriteError, LoopscopeError, first_line
from ..families.adapter import LoopAdapter
from ..storage import index, run_files
from ..storage.write import writer as w
from ..storage.write.buffers import HostBufferPool
from . import distributed, lifetime, metadata, selection
from .detect import resolve_adapter
from .install import Installed
from .options import CaptureOptions
from .tracking import Tracker
from .transfer import DeviceTransfer
from .user_frames import user_stacklevel


class Capture:
    """Hooks attached to one model, writing to one file. Close it (or use ``with``) to flush and detach.

    Made by :func:`attach`; ``path`` is the index file's absolute path; ``adapter`` says where the loop is,
    ``pool`` and ``writer`` are the host buffers and the writer thread (their statistics are stored in the index
    at close)."""

    def __init__(self, model: nn.Module, path: str | os.PathLike, loop, options: CaptureOptions):
        self.model = model
        # absolute, resolved once: the writer opens run files long after attach(), and an os.chdir() (a notebook's
        # %cd) meanwhile must not move them away from the index; ``path`` is this absolute path of the index
        self.path = os.path.abspath(distributed.rank_path(path))  # under torchrun: one file per rank
        self.tokenizer = options.tokenizer
        self.adapter = resolve_adapter(model, loop)
        selection.check_stride_for(options.step_stride, self.adapter)
        self._locking = options.locking
        self._closed = False
        self._stopped = False  # hooks removed: recording has ended, and close() finishes the rest (again if cut)
        self._pid = os.getpid()  # the process whose writer thread this is (a fork's child has none)
        # held until close: mode="w" from another capture is refused meanwhile (see run_files.WriterLock)
        self._writer_lock = index.create_index(
            self.path,
            options.mode,
            header=metadata.describe(model, self.adapter, options.describe()),
            readout=metadata.readout_params(model, self.adapter),
            locking=options.locking,
        )
        try:
            self._start(model, options)
        except BaseException:
            if self._writer_lock is not None:
                self._writer_lock.release()
            raise
        self._ending = lifetime.Ending(self.writer, self.pool, self.path, options.locking, self._writer_lock)
        self._when_dropped = lifetime.finish_when_dropped(self, self._ending)  # dropped unclosed: runs still kept
        _OPEN.add(self)

    def _start(self, model: nn.Module, options: CaptureOptions) -> None:
        self.pool = HostBufferPool(int(options.buffer_mb * (1 << 20)))
        self.writer = w.CaptureWriter(
            run_files.RunFiles(self.path, locking=options.locking),
            self.pool,
            compression=options.compression,
            inner_steps={s.name: s.inner_steps for s in self.adapter.loops if s.inner_steps},
        )
        self._tracker = Tracker(
            model,
            self.adapter,
            self.writer,
            DeviceTransfer(self.pool),
            tokenizer=options.tokenizer,
            tokens=options.tokens,
            stride=options.step_stride,
            cast=options.cast,
            chunks=options.chunks,
            next_run=run_files.next_run_index(self.path),
            abort=self._abort,
        )
        self._installed = Installed(model)
        try:
            self._install()
        except BaseException:
            self._installed.remove()
            self.writer.close()
            raise

    def _install(self) -> None:
        model, tracker, on = self.model, self._tracker, self._installed
        on.before(model, tracker.on_model_enter)
        tracker.keep_hooks_last = on.keep_last  # at each forward's start: hooks added since go before ours
        on.after(model, tracker.on_model_exit, with_kwargs=True)
        for spec in self.adapter.loops:
            exits = [model.get_submodule(path) for path in spec.exit.split("|")]  # tied copies: a call each is a step
            entry = model.get_submodule(spec.entry) if spec.entry else exits[0]
            tracker.entry_switches[spec.name] = on.before_while_on(entry, tracker.entry_hook(spec))
            for module in exits:
                on.after_all(module, tracker.exit_hook(spec))
            for signal, path in spec.signals:
                on.after_all(model.get_submodule(path), tracker.signal_hook(spec, signal))
        on.wrap_method("forward", tracker.forward_call)
        for name in ("generate", *self.adapter.call_methods):
            on.wrap_method(name, functools.partial(tracker.whole_call, name))
        for name in self.adapter.entry_methods:
            on.wrap_method(name, tracker.side_entry)

    # ---- public --------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def flush(self) -> None:
        """Wait until everything captured so far is on disk: completed runs are then readable by other processes."""
        if self._closed:
            return
        try:
            self.writer.drain()
        except CaptureWriteError as exc:  # the writer failed: stop recording and close, as a failed call does
            self._abort(exc)
            raise

    def close(self) -> None:
        """Remove every hook, finish open runs, link them into the index file. Safe to call twice, and a close cut
        short (Ctrl-C while it waits for the writer) is finished by the next one, or at the process's exit."""
        if self._closed:
            return
        if not self._stopped:
            self._stopped = self._tracker.closed = True
            self._installed.remove()
            self._tracker.end_session(complete=False)
            self._tracker.gate.warn_skipped()  # name the forwards other threads ran meanwhile, unrecorded
        failed = self._ending.finish(self._tracker.orphan_calls)
        self._closed = True  # not before: a close cut short (Ctrl-C) is finished by the next
        self._when_dropped.detach()
        _OPEN.discard(self)
        if failed is not None and self.writer.error is None:  # else the writer's error (disk full) is the one
            raise failed
        if orphans := self._tracker.orphan_calls:
            warnings.warn(
                f"loopscope: {orphans} loop call(s) happened outside the model's forward() and were not "
                "recorded (e.g. a custom decoding loop calling sub-modules directly)",
                stacklevel=2,
            )
        self.writer.raise_if_failed()

    def _abort(self, exc: BaseException) -> None:
        """An exception inside a captured call (the model's, or a write failure): stop recording, keep completed
        runs, mark the interrupted ones incomplete, close the file. The caller re-raises ``exc`` unchanged."""
        if self._closed:
            return
        try:
            self.close()
        except Exception as secondary:  # e.g. the writer's own error; the original exception is the one to see
            if str(secondary) != str(exc) and hasattr(exc, "add_note"):
                exc.add_note(f"loopscope: while closing the capture: {secondary}")
        # said at once: a caller that catches the exception and goes on would otherwise record nothing, unaware
        warnings.warn(
            f"loopscope: {type(exc).__name__} in a captured call closed the capture {self.path} (its completed runs "
            "are kept); attach again with mode='a' to record more",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        return f"<loopscope.Capture {self.path!r} {state}, loops {[s.exit for s in self.adapter.loops]}>"


# Captures not closed yet, closed at the interpreter's exit: a script that ends (or dies of an exception) without
# close() would otherwise lose the runs still queued, and its daemon writer thread, frozen at shutdown while it holds
# h5py's lock, could deadlock the interpreter's own cleanup of h5py objects. Weak: one dropped unclosed with its
# model is finished when collected (lifetime.py), and those are waited for here too.
_OPEN: weakref.WeakSet[Capture] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for capture in list(_OPEN):
        if capture._pid != os.getpid():  # a forked child (see _let_go_in_child): nothing of it to close here
            continue
        try:
            capture.close()
        except BaseException as exc:  # at exit nobody can catch it: say it, then close the others
            print(f"loopscope: closing {capture.path} at exit failed: {first_line(exc)}", file=sys.stderr)
    lifetime.finish_dropped()


def _let_go_in_child() -> None:
    """In a child forked after attach() (a DataLoader worker, a fork-based pool), the parent's captures have no
    writer thread: the parent's queue and pool would fill and the child's model wait for good, and closing would wait
    forever. So each is closed there at once, without a write: its hooks come off the child's copy of the model,
    which runs as if loopscope were not attached, and the parent's files are left to the parent."""
    for capture in list(_OPEN):
        if capture._pid != os.getpid():
            capture._stopped = capture._tracker.closed = capture._closed = True
            capture._installed.remove()
            capture._when_dropped.detach()
            if capture._writer_lock is not None:  # the child's copy of the descriptor: the parent's lock stays
                capture._writer_lock.release()
            _OPEN.discard(capture)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


def attach(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    loop: str | list[str] | LoopAdapter | None = None,
    mode: str = "w-",
    dtype: str = "keep",
    buffer_mb: float = 64,
    compression: str | None = None,
    chunks: tuple[int, int] | None = None,
    locking: bool | str | None = None,
    tokens: str | slice | range | list[int] | tuple[int, ...] = "all",
    step_stride: int = 1,
    **unknown: NoReturn,
) -> Capture:
    """Record every iteration of ``model``'s loop into the HDF5 capture ``path``; returns the :class:`Capture`
    (close it, or use ``with``, to finish the file).

    Options:
        tokenizer: a tokenizer with ``decode()``; each token's text is then stored beside its id.
        loop: where the loop is, overriding detection: a dotted module path whose one call is one iteration, a
            list of them (one loop each), or a :class:`LoopAdapter`.
        mode: ``"w-"`` (or ``"x"``) refuses an existing capture, ``"w"`` replaces it, ``"a"`` adds runs to it.
        dtype: ``"keep"`` stores states as computed; ``"float32"``, ``"float16"`` or ``"bfloat16"`` cast them.
        buffer_mb: host memory for states on their way to disk (MiB); when it is full the model waits
            (back-pressure, counted in the file).
        compression: ``None``, ``"gzip"``, ``"lzf"``, or with ``loopscope[compress]`` ``"lz4"``, ``"zstd"``,
            ``"blosc-lz4"``, ``"bitshuffle-lz4"``.
        chunks: ``(tokens, steps)`` per HDF5 chunk of states; sized from the data when ``None``.
        locking: h5py file locking (``None``: HDF5's default; ``False`` on network file systems whose locks fail).
        tokens: which tokens to store: ``"all"``, ``"prompt"``, ``"generated"``, or token indices (a slice, range
            or list), applied on the model's device before any copy.
        step_stride: store s0, every n-th iteration and each token's last one (``Run.step_iterations()`` maps
            stored steps back to iterations).

    Any other keyword is a one-line error listing these (type checkers flag it too: ``**unknown`` takes nothing).
    """
    if unknown:
        known = [p.name for p in inspect.signature(attach).parameters.values() if p.kind is p.KEYWORD_ONLY]
        raise LoopscopeError(f"attach() got unknown option(s) {sorted(unknown)}; the options are {', '.join(known)}")
    if not isinstance(model, nn.Module):
        raise LoopscopeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    options = CaptureOptions.check(
        tokenizer=tokenizer,
        mode=mode,
        dtype=dtype,
        buffer_mb=buffer_mb,
        compression=compression,
        chunks=chunks,
        locking=locking,
        tokens=tokens,
        step_stride=step_stride,
    )
    return Capture(model, path, loop, options)
