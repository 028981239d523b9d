"""The single background thread that owns all HDF5 writes of one capture.

h5py serialises every call behind one global lock, so parallel writers gain nothing; one thread fed by a bounded
queue keeps the model's thread free of file I/O. The model side (``hooks/capture.py``) only ever puts messages
(``messages.py``); this thread creates one file per run, grows its datasets in large blocks (``run_handles.py``),
turns slabs into whole chunks (see ``staging.py``) and hands the slabs back to the pool, and when the run completes
trims it, closes it and renames it into place (see ``run_files.py`` for why).
A failure here (disk full, permissions) is kept and re-raised on the model's thread at its next hook call, so the
user sees one clear error instead of a silent gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ...errors import CaptureWriteError, disk_full, hdf5_line
from .. import compression as filters
from .. import schema
from .messages import Batch, CloseRuns, Message, OpenRuns, Signal, State, Steps, Tokens, token_texts
from .objects import DatasetMaker, write_attrs
from .outbox import Outbox
from .preallocate import Reserve
from .run_handles import RunHandles
from .staging import ChunkBudget, ChunkStager

if TYPE_CHECKING:
    from ..run_files import RunFiles
    from .buffers import HostBufferPool

# What the hooks use, as ``writer.<name>``: the writer and the messages it takes.
__all__ = [
    "STAGING_SHARE",
    "TOKEN_CHUNK",
    "CaptureWriter",
    "CloseRuns",
    "OpenRuns",
    "Signal",
    "State",
    "Steps",
    "Tokens",
    "token_texts",
]

TOKEN_CHUNK = 1024  # tokens per chunk of a run's per-token datasets (read when a run opens)
# Small chunks (4 KiB): run files have no chunk cache, so each decoded token's signal write reads and rewrites one.
SIGNAL_CHUNK = (64, 16)
# Chunks being assembled (see staging.py) may hold up to this share of ``buffer_mb``, beside the pool's slabs:
# extra host memory stays under 1.5 x buffer_mb plus HDF5's own per-file caches.
STAGING_SHARE = 0.5


class _Stop:
    """Ends the thread, after every message queued before it."""


class CaptureWriter:
    """Owns the open ``h5py.File`` and the thread that writes into it."""

    def __init__(
        self,
        layout: RunFiles,
        pool: HostBufferPool,
        *,
        queue_size: int = 256,
        compression: str | None = None,
        inner_steps: dict[str, int | str] | None = None,
        checksums: bool = True,
    ):
        self.layout = layout
        # Fletcher-32 on every chunked dataset (HDF5 checks it on every read); False only to measure its cost
        self.checksums = checksums
        self._filename = layout.index_path
        self.pool = pool
        self.compression = compression
        self._filter_options = filters.dataset_options(compression)
        self.datasets = DatasetMaker()  # creation settings built once for every run file of the capture
        self.staging = ChunkBudget(int(pool.budget_bytes * STAGING_SHARE))
        self.inner_steps = inner_steps or {}
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.cpu_seconds = 0.0  # CPU time of the writer thread, set when it ends (benchmarks price the writer with it)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._runs: dict[int, RunHandles] = {}
        self._closing: dict[int, RunHandles] = {}  # the run being finished, until its file is closed and renamed
        self._outbox = Outbox(self._queue)  # the model's thread puts messages through it
        pool.before_wait = self.send_deferred  # deferred messages hold slabs: sent before a wait for one
        # Set when the thread has ended. close() waits on this, not on Thread.join(): a join cut short by Ctrl-C can
        # return at once the next time (CPython) while the thread still writes, and files would close under it.
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="loopscope-writer", daemon=True)
        self._thread.start()

    # ---- model-thread side -------------------------------------------------------------------------------------
    def put(self, message) -> None:
        """Queue a message (blocks when the queue is full, which bounds memory together with the pool); inside
        :meth:`together`, hold it back for the block's one :class:`Batch` (see ``outbox.py``)."""
        self.raise_if_failed()
        self._outbox.put(message)

    def together(self):
        """Messages put inside the ``with`` block go to the writer as one :class:`Batch`, sent with those of the
        next decoded tokens (see ``outbox.py``). Only around code that never waits for the writer."""
        return self._outbox.together()

    def send_deferred(self) -> None:
        """Queue the closing messages of forwards that wait to be sent together (the pool asks, before a wait)."""
        self._outbox.push()

    def raise_if_failed(self) -> None:
        if self.error is not None:
            reason = hdf5_line(self.error)
            error = CaptureWriteError(
                f"writing {self._filename} failed, recording stopped and hooks removed: {reason[:200]}"
            )
            error.original = self.error  # the OS error, for code that wants it; not chained, so one traceback
            raise error from None

    def drain(self) -> None:
        """Block until every queued message is written (completed runs are then renamed into place)."""
        if not self._done.is_set():
            self._outbox.push()
            self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        """Drain the queue, stop the thread, close the files of any run left unfinished. A close interrupted while
        it waits (Ctrl-C) is finished by calling it again."""
        if not self._done.is_set():
            self._outbox.push()
            self._queue.put(_Stop())  # again after an interrupted close: the thread ends at the first, harmlessly
            self._done.wait()
        self._thread.join()  # the thread has ended: this returns at once
        self.abandon_open_runs()
        self.staging.clear()

    # ---- writer-thread side -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        finally:
            self.cpu_seconds = time.thread_time()
            self._done.set()

    def _serve(self) -> None:
        while True:
            message = self._queue.get()
            if isinstance(message, _Stop):
                self._queue.task_done()
                return
            try:
                if self.error is None:
                    self._handle(message)
            except BaseException as exc:  # kept and re-raised on the model's thread
                self.error = exc
            finally:
                if isinstance(message, Message):
                    message.give_back(self.pool)
                self._queue.task_done()

    # What the thread does with each kind of message: a new message is one class in messages.py and one entry here.
    # Handlers are named rather than bound, so one replaced on the class or the instance is the one called (tests
    # hold writes back; benchmarks/d2h.py times the device copies alone).
    _HANDLERS: ClassVar[dict[type[Message], str]] = {
        OpenRuns: "_open_runs",
        Batch: "_batch",
        Tokens: "_write_tokens",
        State: "_write_state",
        Steps: "_write_steps",
        Signal: "_write_signal",
        CloseRuns: "_close_runs",
    }

    def _handle(self, message) -> None:
        handler = self._HANDLERS.get(type(message))
        if handler is None:  # pragma: no cover - programming error
            raise TypeError(f"unknown writer message {type(message).__name__}")
        getattr(self, handler)(message)

    def _batch(self, m: Batch) -> None:
        for item in m.items:
            self._handle(item)

    def _open_runs(self, m: OpenRuns) -> None:
        for run_id, attrs in zip(m.run_ids, m.attrs):
            group = self.layout.create_run(run_id, {**schema.attrs_to_store(attrs), "complete": False})
            handles = RunHandles(
                group,
                TOKEN_CHUNK,
                one_forward=attrs.get("call") == "forward",
                reserve=Reserve(group.filename),
                checksums=self.checksums,
                datasets=self.datasets,
            )
            self._runs[run_id] = handles

    def _write_tokens(self, m: Tokens) -> None:
        token_ids, attention_mask, positions = m.arrays()
        strings = m.text(token_ids)
        t = token_ids.shape[1]
        end = m.offset + t
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            values = {
                "token_ids": token_ids[b],
                "attention_mask": attention_mask[b],
                "positions": positions[b],
                "forward_index": np.full(t, m.forward_index, dtype=np.int32),
            }
            if strings is not None:
                values["token_ends"] = np.array(strings[b], dtype=object)  # encoded when written
            for name, value in values.items():
                h.add_pending(name, m.offset, value)  # copied: the arrays may go back to the scratch
            h.n_tokens = max(h.n_tokens, end)

    def _loop_handles(self, h: RunHandles, loop: str, hidden: int, m: State, tokens: int):
        """The loop's datasets in this run, created at its first write, in the chunks the message names (the
        capture picks them, since it lays out its slabs in them)."""
        if loop in h.loops:
            return h.loops[loop]
        dtype = schema.stored_numpy_dtype(m.logical_dtype)
        if m.chunks is not None:
            chunks = (m.chunks[0], m.chunks[1], hidden)
        else:
            chunks = schema.state_chunks(hidden, dtype.itemsize, None, tokens, more_tokens=not h.one_forward)
        group = h.loop_group(loop)  # a signal may have created it already
        # No chunk cache (the run file has none): whole chunks are assembled by the stager and written once.
        options: dict[str, Any] = {
            "shape": (h.capacity, m.step + m.steps, hidden),
            "maxshape": (None, None, hidden),
            "dtype": dtype,
            "chunks": chunks,
            "fillvalue": schema.fill_value(m.logical_dtype),
            "fletcher32": self.checksums,
        }
        if self.compression is None:
            states = self.datasets.create(group, "states", **options)
            write_attrs(states, {"logical_dtype": schema.text(m.logical_dtype)})
        else:  # h5py puts Fletcher-32 after the compression, as the last filter
            states = group.create_dataset("states", **options, **self._filter_options)
            states.attrs["logical_dtype"] = schema.text(m.logical_dtype)
            states.attrs["compression"] = schema.text(self.compression)
        stager = ChunkStager(
            states,
            schema.fill_value(m.logical_dtype),
            self.staging,
            filtered=self.compression is not None,
            checksum=self.checksums,
        )
        h.loops[loop] = {
            "group": group,
            "states": states,
            "num_steps": None,
            "max_step": 0,  # num_steps: at its first flush
            "step_capacity": states.shape[1],
            "stager": stager,
        }
        return h.loops[loop]

    def _write_state(self, m: State) -> None:
        array = m.array()
        t, hidden = array.shape[2], array.shape[4]
        last = m.step + m.steps - 1
        message = self._padded_to_plane_end(m, array)
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            if h.reserve is not None:
                h.reserve.ahead(t * message.steps * hidden * array.itemsize)
            h.grow_tokens(m.offset + t)
            loop = self._loop_handles(h, m.loop, hidden, m, m.offset + t)
            if last >= loop["step_capacity"]:  # grown to the steps seen, never past: no edge chunks to trim later
                states = loop["states"]
                states.resize((states.shape[0], last + 1, states.shape[2]))
                loop["step_capacity"] = last + 1
            stager, row = loop["stager"], array[:, b]
            decoded = t == 1 and row.shape[2] == stager.ck  # one token, its planes in the chunk depth
            if not (
                decoded and stager.write_token(m.offset, message.step, message.plane_start, row[:, 0], message.steps)
            ):
                for step, block in message.planes(row):
                    stager.write(m.offset, step, block)
            loop["max_step"] = max(loop["max_step"], last)
            self.bytes_written += t * m.steps * hidden * array.itemsize

    def _padded_to_plane_end(self, m: State, array: np.ndarray) -> State:
        """The forward's last slab of a loop, its last plane filled up with the fill value: these tokens get no
        more steps, so the plane's empty rows are NaN for good, and each chunk it covers is written whole from the
        slab instead of being assembled in a buffer. (Only for blocks that hold whole chunks of tokens.) Rows past
        the dataset's extent are stored in its edge chunks as HDF5 does, and read NaN should the extent grow."""
        depth = array.shape[3]
        room = -(m.step + m.steps - m.plane_start) % depth
        if not m.last or not room or array.shape[2] < (m.chunks or (1 << 62,))[0]:
            return m
        end = m.step + m.steps - m.plane_start
        array[end // depth, :, :, depth - room :] = schema.fill_value(m.logical_dtype)
        return dataclasses.replace(m, steps=m.steps + room)

    def _write_steps(self, m: Steps) -> None:
        """A forward's step counts, sent after its states: its tokens are final, so their chunks can be written."""
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            h.add_pending(f"loops/{m.loop}", m.offset, m.counts(b))
            loop = h.loops.get(m.loop)
            if loop is not None:
                loop["stager"].finish_tokens(m.offset + m.tokens)

    def _write_signal(self, m: Signal) -> None:
        values = m.block()
        t, k = values.shape[1], values.shape[2]
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            h.grow_tokens(m.offset + t)
            signals = h.signals.setdefault(m.loop, {})
            ds = signals.get(m.name)
            if ds is None:
                group = h.loop_group(m.loop).require_group(schema.SIGNALS)
                ds = signals[m.name] = self.datasets.create(
                    group,
                    m.name,
                    shape=(h.capacity, SIGNAL_CHUNK[1]),
                    maxshape=(None, None),
                    dtype=np.dtype(np.float32),
                    chunks=SIGNAL_CHUNK,
                    fillvalue=np.nan,
                    fletcher32=self.checksums,
                )
            if m.step + k > ds.shape[1]:
                ds.resize((ds.shape[0], max(m.step + k, 2 * ds.shape[1])))
            ds[m.offset : m.offset + t, m.step : m.step + k] = values[b]

    def _close_runs(self, m: CloseRuns) -> None:
        for run_id in m.run_ids:
            try:
                self._close_run(run_id, m)
            except BaseException:
                if run_id in self._closing:  # not finished: closed with the others by abandon_open_runs
                    self._runs[run_id] = self._closing.pop(run_id)
                raise

    def _close_run(self, run_id: int, m: CloseRuns) -> None:
        h = self._closing[run_id] = self._runs.pop(run_id)
        h.finish(self.inner_steps)
        write_attrs(h.group, {**schema.attrs_to_store(m.attrs), "n_tokens": h.n_tokens, "complete": m.complete})
        path = self.layout.finish_run(run_id, h.group, complete=m.complete)
        del self._closing[run_id]
        if h.reserve is not None:
            h.reserve.release(path)

    def abandon_open_runs(self) -> None:
        """Close files of runs that never completed (after a failure), leaving them marked partial."""
        for run_id, h in list(self._runs.items()):
            h.drop_datasets()  # first, so no dataset handle outlives its file
            if disk_full(self.error):  # HDF5 writes its metadata at close, and a close that fails for want of
                # space leaves the file half-closed inside HDF5, which then crashed the process at exit. The run is
                # lost anyway: give its blocks back first, so the close succeeds (it stays a .partial file).
                with contextlib.suppress(OSError):
                    os.truncate(h.group.filename, 0)
            try:
                h.group.close()
            except Exception:  # the file may be unwritable (disk full): it stays a .partial file either way
                pass
            if h.reserve is not None:
                h.reserve.release()
            self._runs.pop(run_id)
