"""The single background thread that owns all HDF5 writes of one capture.

h5py serialises every call behind one global lock, so parallel writers gain nothing; one thread fed by a bounded
queue keeps the model's thread free of file I/O. The model side (``hooks/capture.py``) only ever puts messages;
this thread creates one file per run, grows its datasets in large blocks, turns slabs into whole chunks (see
``staging.py``) and hands the slabs back to the pool, and when the run completes trims it, closes it and renames it
into place (see ``run_files.py`` for why).
A failure here (disk full, permissions) is kept and re-raised on the model's thread at its next hook call, so the
user sees one clear error instead of a silent gap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch

from .. import checksum, compression as filters, schema
from .buffers import HostBufferPool
from ..run_files import RunFiles
from ...errors import CaptureWriteError
from .preallocate import Reserve
from .staging import ChunkBudget, ChunkStager

TOKEN_CHUNK = 1024
# Chunks being assembled (see staging.py) may hold up to this share of ``buffer_mb``, beside the pool's slabs:
# extra host memory stays under 1.5 x buffer_mb plus HDF5's own per-file caches.
STAGING_SHARE = 0.5


@dataclass
class OpenRuns:
    run_ids: list[int]
    attrs: list[dict[str, Any]]


@dataclass
class Tokens:
    """A forward's tokens. The arrays are numpy arrays or host tensors; copied off a CUDA device they are pinned
    tensors still being filled on a side stream (``ready``: events to wait on), so the hook never waits for the
    device. ``keep`` selects the stored tokens here on the writer's thread; their text is ``strings``, or made here
    with ``decode`` (the tokenizer's) when the ids were still on their way; ``scratch`` takes the pinned tensors
    back once read."""

    run_ids: list[int]
    offset: int
    token_ids: Any  # [B, T] int64
    attention_mask: Any  # [B, T] int8
    positions: Any  # [B, T] int64
    forward_index: int
    strings: list[list[str]] | None = None
    keep: np.ndarray | None = None  # indices of the stored tokens (tokens=...), None = all
    decode: Any = None
    ready: Any = None
    scratch: Any = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, mask, positions) of the stored tokens, [B, T'] each, once their copies have landed."""
        _wait(self.ready)
        arrays = [a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
                  for a in (self.token_ids, self.attention_mask, self.positions)]
        if self.keep is not None:
            arrays = [a[:, self.keep] for a in arrays]
        return arrays[0], arrays[1], arrays[2]

    def text(self, ids: np.ndarray) -> list[list[str]] | None:
        if self.strings is not None or self.decode is None:
            return self.strings
        return token_texts(ids, self.decode)

    def give_back(self) -> None:
        if self.scratch is not None:
            self.scratch.give(self.token_ids, self.attention_mask, self.positions)


@dataclass
class State:
    """Consecutive stored steps ``step .. step + steps - 1`` of a block of tokens of every run in a batch.

    The slab is laid out in the run's chunks: ``slab[p, b, :, d]`` is step ``base + p * D + d`` of run
    ``run_ids[b]``, P planes of D steps each. With D the chunk depth and ``base`` on a chunk boundary, every chunk
    a plane covers whole is one contiguous block of the slab, written as it is: no copy between hook and file.
    """

    run_ids: list[int]
    loop: str
    offset: int
    step: int
    slab: torch.Tensor  # [P, B, T, D, H] host tensor from the pool
    steps: int
    logical_dtype: str
    ready: Any = None  # CUDA events to wait on before reading the slab, when the copy was asynchronous
    base: int | None = None  # the step of plane 0's first row; None: ``step``
    chunks: tuple[int, int] | None = None  # (tokens, steps) per chunk, used when the run's dataset is created
    last: bool = False  # the forward's last slab of this loop: its tokens get no more steps

    @property
    def plane_start(self) -> int:
        """The step of plane 0's first row."""
        return self.step if self.base is None else self.base

    def planes(self, row: np.ndarray):
        """(first step, [T, n, H] block) of each plane's recorded steps in ``row`` [P, T, D, H], one batch row."""
        base = self.plane_start
        planes, tokens, depth, hidden = row.shape
        end = self.step + self.steps
        if tokens == 1 and planes > 1:  # one decoded token: its planes are consecutive in memory, one block
            yield self.step, row.reshape(1, planes * depth, hidden)[:, self.step - base : end - base]
            return
        for p in range(planes):
            lo, hi = max(self.step, base + p * depth), min(end, base + (p + 1) * depth)
            if lo < hi:
                yield lo, row[p, :, lo - base - p * depth : hi - base - p * depth]


@dataclass
class Steps:
    run_ids: list[int]
    loop: str
    offset: int
    num_steps: np.ndarray  # [B, T] int32


@dataclass
class Signal:
    """A per-token scalar recorded beside a loop's states (an exit gate, an exit criterion's value):
    ``values[b, :, j]`` is step ``step + j`` of ``run_ids[b]``'s tokens ``offset ..``; NaN where not recorded."""

    run_ids: list[int]
    loop: str
    name: str
    offset: int
    step: int
    values: Any  # [B, T, K] float32, a numpy array or a host tensor (pinned, still landing, as in Tokens)
    slots: np.ndarray | None = None  # values[..., j] is step ``step + slots[j]`` (NaN between); None: ``step + j``
    ready: Any = None
    scratch: Any = None

    def block(self) -> np.ndarray:
        """[B, T, K] over consecutive steps from ``step``, once the copy has landed."""
        _wait(self.ready)
        values = self.values.numpy() if isinstance(self.values, torch.Tensor) else self.values
        if self.slots is None:
            return values
        block = np.full(values.shape[:2] + (int(self.slots.max()) + 1,), np.nan, dtype=np.float32)
        block[:, :, self.slots] = values
        return block

    def give_back(self) -> None:
        if self.scratch is not None:
            self.scratch.give(self.values)


# Small chunks (4 KiB): run files have no chunk cache, so each decoded token's signal write reads and rewrites one.
SIGNAL_CHUNK = (64, 16)


@dataclass
class CloseRuns:
    """End runs: trim datasets to what was written, flush. ``complete=False`` marks runs cut short by an error."""

    run_ids: list[int]
    complete: bool = True
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stop:
    pass


@dataclass
class _RunHandles:
    group: h5py.File  # the run's own file; its root is the run group
    capacity: int = 0
    n_tokens: int = 0
    token_sets: dict[str, h5py.Dataset] = field(default_factory=dict)
    loops: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-token metadata waits here and is written TOKEN_CHUNK tokens at a time (decoding makes one token per
    # forward: writing each as it comes would cost six HDF5 calls per token).
    pending: dict[str, "_Pending"] = field(default_factory=dict)
    token_bytes: h5py.Dataset | None = None  # the tokens' utf-8 text, concatenated (no variable-length strings)
    token_bytes_used: int = 0
    signals: dict[str, dict[str, h5py.Dataset]] = field(default_factory=dict)  # loop -> signal name -> [T, K]
    one_forward: bool = False  # a forward() run: its first forward is all its tokens
    reserve: Reserve | None = None  # disk blocks reserved ahead of the states' writes (see preallocate.py)


class _Pending:
    """Consecutive per-token values of one dataset, gathered in one reused array.

    One preallocated block per dataset rather than a list of small arrays: thousands of tiny long-lived arrays
    interleaved with the model's own allocations fragment the heap, and RSS grew by ~350 KB per decoded token.
    """

    def __init__(self, dtype):
        self.values = np.empty(TOKEN_CHUNK, dtype=dtype)
        self.start = 0
        self.count = 0

    def fits(self, offset: int, n: int) -> bool:
        return self.count == 0 or (offset == self.start + self.count and self.count + n <= len(self.values))

    def add(self, offset: int, values: np.ndarray) -> None:
        if self.count == 0:
            self.start = offset
            if len(values) > len(self.values):
                self.values = np.empty(len(values), dtype=self.values.dtype)
        self.values[self.count : self.count + len(values)] = values
        self.count += len(values)


class CaptureWriter:
    """Owns the open ``h5py.File`` and the thread that writes into it."""

    def __init__(
        self,
        layout: RunFiles,
        pool: HostBufferPool,
        *,
        queue_size: int = 256,
        compression: str | None = None,
        inner_steps: dict[str, int] | None = None,
        checksums: bool = True,
    ):
        self.layout = layout
        # Fletcher-32 on every chunked dataset (HDF5 checks it on every read); False only to measure its cost
        self.checksums = checksums
        self._filename = layout.index_path
        self.pool = pool
        self.compression = compression
        self._filter_options = filters.dataset_options(compression)
        self.staging = ChunkBudget(int(pool.budget_bytes * STAGING_SHARE))
        self.inner_steps = inner_steps or {}
        self.error: BaseException | None = None
        self.bytes_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._runs: dict[int, _RunHandles] = {}
        self._closing: dict[int, _RunHandles] = {}  # the run being finished, until its file is closed and renamed
        self._thread = threading.Thread(target=self._loop, name="loopscope-writer", daemon=True)
        self._thread.start()

    # ---- model-thread side -------------------------------------------------------------------------------------
    def put(self, message) -> None:
        """Queue a message (blocks when the queue is full, which bounds memory together with the pool)."""
        self.raise_if_failed()
        self._queue.put(message)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            reason = _one_line(self.error)
            error = CaptureWriteError(
                f"writing {self._filename} failed, recording stopped and hooks removed: {reason[:200]}"
            )
            error.original = self.error  # the OS error, for code that wants it; not chained, so one traceback
            raise error from None

    def drain(self) -> None:
        """Block until every queued message is written (completed runs are then renamed into place)."""
        if self._thread.is_alive():
            self._queue.join()
        self.raise_if_failed()

    def close(self) -> None:
        """Drain the queue, stop the thread, close the files of any run left unfinished."""
        if self._thread.is_alive():
            self._queue.put(_Stop())
            self._thread.join()
        self.abandon_open_runs()
        self.staging.clear()

    # ---- writer-thread side -------------------------------------------------------------------------------------
    def _loop(self) -> None:
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
                if isinstance(message, State):
                    self.pool.release(message.slab)
                elif isinstance(message, (Tokens, Signal)):
                    message.give_back()
                self._queue.task_done()

    def _handle(self, message) -> None:
        if isinstance(message, OpenRuns):
            self._open_runs(message)
        elif isinstance(message, Tokens):
            self._write_tokens(message)
        elif isinstance(message, State):
            self._write_state(message)
        elif isinstance(message, Steps):
            self._write_steps(message)
        elif isinstance(message, Signal):
            self._write_signal(message)
        elif isinstance(message, CloseRuns):
            self._close_runs(message)
        else:  # pragma: no cover - programming error
            raise TypeError(f"unknown writer message {type(message).__name__}")

    def _open_runs(self, m: OpenRuns) -> None:
        for run_id, attrs in zip(m.run_ids, m.attrs):
            group = self.layout.create_run(run_id)
            group.attrs.update(schema.attrs_to_store(attrs))
            group.attrs["complete"] = False
            handles = _RunHandles(group, one_forward=attrs.get("call") == "forward", reserve=Reserve(group.filename))
            group.create_group(schema.LOOPS)
            self._runs[run_id] = handles

    def _grow_tokens(self, handles: _RunHandles, needed: int) -> None:
        """Token extent of the run's datasets: exactly its tokens for a forward() run (they all come at once, so
        nothing is trimmed at close), else grown in doubling blocks."""
        if needed <= handles.capacity:
            return
        capacity = needed if handles.one_forward else max(needed, 2 * handles.capacity, TOKEN_CHUNK)
        for ds in handles.token_sets.values():
            ds.resize((capacity,))
        for loop in handles.loops.values():
            if loop["num_steps"] is not None:
                loop["num_steps"].resize((capacity,))
            states = loop["states"]
            states.resize((capacity,) + states.shape[1:])
        for signals in handles.signals.values():
            for ds in signals.values():
                ds.resize((capacity, ds.shape[1]))
        handles.capacity = capacity

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
                self._add_pending(h, name, m.offset, value)  # copied: the arrays may go back to the scratch
            h.n_tokens = max(h.n_tokens, end)

    def _add_pending(self, h: _RunHandles, name: str, offset: int, values: np.ndarray) -> None:
        pending = h.pending.get(name)
        if pending is None:
            pending = h.pending[name] = _Pending(values.dtype)
        if not pending.fits(offset, len(values)):
            self._flush_pending(h)
        pending.add(offset, values)

    def _flush_pending(self, h: _RunHandles) -> None:
        """Write the per-token metadata gathered so far, one contiguous write per dataset. Each dataset is created
        by its first write, with its values: a run of up to TOKEN_CHUNK tokens writes each in one call at close."""
        self._grow_tokens(h, h.n_tokens)
        for name, pending in h.pending.items():
            if not pending.count:
                continue
            values, start = pending.values[: pending.count], pending.start
            pending.count = 0
            if name.startswith("loops/"):  # loops/<name>/num_steps
                loop = h.loops.get(name.split("/", 1)[1])
                if loop is None:  # the loop never ran for these tokens: nothing but s0 to say
                    continue
                loop["num_steps"] = _token_values(h, loop["num_steps"], loop["group"], "num_steps", start, values,
                                                  self.checksums)
                continue
            if name == "token_ends":
                values = self._append_token_text(h, values)
            h.token_sets[name] = _token_values(h, h.token_sets.get(name), h.group, name, start, values,
                                               self.checksums)

    def _append_token_text(self, h: _RunHandles, strings: np.ndarray) -> np.ndarray:
        """Append the tokens' utf-8 bytes to ``token_bytes``; returns where each token's text ends."""
        encoded = [str(t).encode("utf-8") for t in strings]
        ends = h.token_bytes_used + np.cumsum([len(e) for e in encoded], dtype=np.int64)
        new_end = int(ends[-1]) if len(ends) else h.token_bytes_used
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        if h.token_bytes is None:
            h.token_bytes = h.group.create_dataset(
                "token_bytes", data=data, maxshape=(None,), chunks=(16 * TOKEN_CHUNK,), fletcher32=self.checksums
            )
        elif new_end > h.token_bytes_used:
            if new_end > h.token_bytes.shape[0]:
                h.token_bytes.resize((max(new_end, 2 * h.token_bytes.shape[0]),))
            h.token_bytes[h.token_bytes_used : new_end] = data
        h.token_bytes_used = new_end
        return ends

    def _loop_handles(self, h: _RunHandles, loop: str, hidden: int, m: State, tokens: int):
        """The loop's datasets in this run, created at its first write, in the chunks the message names (the
        capture picks them, since it lays out its slabs in them)."""
        if loop in h.loops:
            return h.loops[loop]
        dtype = schema.stored_numpy_dtype(m.logical_dtype)
        if m.chunks is not None:
            chunks = (m.chunks[0], m.chunks[1], hidden)
        else:
            chunks = schema.state_chunks(hidden, dtype.itemsize, None, tokens, more_tokens=not h.one_forward)
        group = h.group[schema.LOOPS].require_group(loop)  # a signal may have created it already
        # No chunk cache: whole chunks are assembled by the stager and written once (see staging.py).
        states = group.create_dataset(
            "states",
            shape=(h.capacity, m.step + m.steps, hidden),
            maxshape=(None, None, hidden),
            dtype=dtype,
            chunks=chunks,
            fillvalue=schema.fill_value(m.logical_dtype),
            rdcc_nbytes=0,
            fletcher32=self.checksums,  # h5py puts it after any compression, as the last filter
            **self._filter_options,
        )
        states.attrs["logical_dtype"] = schema.text(m.logical_dtype)
        if self.compression is not None:
            states.attrs["compression"] = schema.text(self.compression)
        stager = ChunkStager(
            states, schema.fill_value(m.logical_dtype), self.staging, filtered=self.compression is not None,
            checksum=self.checksums,
        )
        h.loops[loop] = {
            "group": group, "states": states, "num_steps": None, "max_step": 0,  # num_steps: at its first flush
            "step_capacity": states.shape[1], "stager": stager,
        }
        return h.loops[loop]

    def _write_state(self, m: State) -> None:
        _wait(m.ready)
        if m.logical_dtype == "bfloat16":
            array = m.slab.view(torch.int16).numpy().view(np.uint16)
        else:
            array = m.slab.numpy()
        t, hidden = array.shape[2], array.shape[4]
        last = m.step + m.steps - 1
        message = self._padded_to_plane_end(m, array)
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            h.reserve.ahead(t * message.steps * hidden * array.itemsize)
            self._grow_tokens(h, m.offset + t)
            loop = self._loop_handles(h, m.loop, hidden, m, m.offset + t)
            if last >= loop["step_capacity"]:  # grown to the steps seen, never past: no edge chunks to trim later
                states = loop["states"]
                states.resize((states.shape[0], last + 1, states.shape[2]))
                loop["step_capacity"] = last + 1
            stager, row = loop["stager"], array[:, b]
            decoded = t == 1 and row.shape[2] == stager.ck  # one token, its planes in the chunk depth
            if not (decoded and stager.write_token(m.offset, message.step, message.plane_start, row[:, 0],
                                                   message.steps)):
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
            self._add_pending(h, f"loops/{m.loop}", m.offset, m.num_steps[b])
            loop = h.loops.get(m.loop)
            if loop is not None:
                loop["stager"].finish_tokens(m.offset + m.num_steps.shape[1])

    def _write_signal(self, m: Signal) -> None:
        values = m.block()
        t, k = values.shape[1], values.shape[2]
        for b, run_id in enumerate(m.run_ids):
            h = self._runs[run_id]
            self._grow_tokens(h, m.offset + t)
            signals = h.signals.setdefault(m.loop, {})
            ds = signals.get(m.name)
            if ds is None:
                group = h.group[schema.LOOPS].require_group(m.loop).require_group(schema.SIGNALS)
                ds = signals[m.name] = group.create_dataset(
                    m.name, shape=(h.capacity, SIGNAL_CHUNK[1]), maxshape=(None, None), dtype=np.float32,
                    chunks=SIGNAL_CHUNK, fillvalue=np.nan, fletcher32=self.checksums,
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
        for loop in h.loops.values():
            loop["stager"].flush_all()
        self._flush_pending(h)
        n = h.n_tokens
        for ds in h.token_sets.values():
            _resize(ds, (n,))
        if h.token_bytes is not None:
            _resize(h.token_bytes, (h.token_bytes_used,))
        for name, signals in h.signals.items():
            loop = h.loops.get(name)
            for ds in signals.values():  # as many steps as the loop's states (at least those recorded)
                _resize(ds, (n, loop["max_step"] + 1 if loop else ds.shape[1]))
        for name, loop in h.loops.items():
            if loop["num_steps"] is None:  # no step counts came (HDF5 would have filled it with zeros)
                zeros = np.zeros(n, dtype=np.int32)
                loop["num_steps"] = loop["group"].create_dataset(
                    "num_steps", data=zeros, **checksum.dataset_options(zeros.shape, self.checksums, TOKEN_CHUNK)
                )
            _resize(loop["num_steps"], (n,))
            states = loop["states"]
            _resize(states, (n, loop["max_step"] + 1, states.shape[2]))
            inner = self.inner_steps.get(name)
            if inner:
                labels = nested_labels(loop["max_step"], inner)
                loop["group"].create_dataset(
                    "step_labels", data=labels, **checksum.dataset_options(labels.shape, self.checksums)
                )
        h.group.attrs.update(schema.attrs_to_store(m.attrs))
        h.group.attrs["n_tokens"] = n
        h.group.attrs["complete"] = m.complete
        self.layout.finish_run(run_id, h.group, complete=m.complete)
        del self._closing[run_id]
        h.reserve.release()

    def abandon_open_runs(self) -> None:
        """Close files of runs that never completed (after a failure), leaving them marked partial."""
        for run_id, h in list(self._runs.items()):
            # Drop our dataset handles first, so none outlives its file (HDF5 can crash at exit on such orphans).
            for loop in h.loops.values():
                loop["stager"].drop()
            h.loops.clear()
            h.token_sets.clear()
            h.signals.clear()
            if _disk_full(self.error):  # HDF5 writes its metadata at close, and a close that fails for want of
                # space leaves the file half-closed inside HDF5, which then crashed the process at exit. The run is
                # lost anyway: give its blocks back first, so the close succeeds (it stays a .partial file).
                with contextlib.suppress(OSError):
                    os.truncate(h.group.filename, 0)
            try:
                h.group.close()
            except Exception:  # the file may be unwritable (disk full): it stays a .partial file either way
                pass
            h.reserve.release()
            self._runs.pop(run_id)


def _token_values(h: _RunHandles, ds, group, name: str, start: int, values: np.ndarray,
                  checksums: bool = True) -> h5py.Dataset:
    """Write per-token ``values`` at ``start`` into ``ds`` [T] (resizable, TOKEN_CHUNK chunks, Fletcher-32 unless
    ``checksums`` is False); ``ds`` None: create it, holding them. Returns the dataset."""
    options = {"maxshape": (None,), "chunks": (TOKEN_CHUNK,), "fletcher32": checksums}
    if ds is None and start == 0:
        return group.create_dataset(name, data=values, **options)
    if ds is None:
        ds = group.create_dataset(name, shape=(0,), dtype=values.dtype, **options)
    end = start + len(values)
    if end > ds.shape[0]:
        ds.resize((max(end, h.capacity),))
    ds[start:end] = values
    return ds


def token_texts(ids, decode) -> list[list[str]]:
    """Each token's own text, [B, T] ids (a tensor or an array); -1 (an embedded input without an id) has none."""
    return [[decode([int(i)]) if i >= 0 else "" for i in row] for row in ids.tolist()]


def _disk_full(error: BaseException | None) -> bool:
    """Whether a write failed for want of space (a full disk or quota)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def _wait(events) -> None:
    """Wait for the CUDA events a message's host copies were recorded with (None: copies already done)."""
    for event in events or ():
        event.synchronize()


def _resize(ds: h5py.Dataset, shape: tuple[int, ...]) -> None:
    """Resize unless already that shape (HDF5 walks the chunk index even for a no-op resize)."""
    if ds.shape != shape:
        ds.resize(shape)


def _one_line(error: BaseException) -> str:
    """HDF5 errors span lines and bury the OS reason ("File too large", "No space left on device"): surface it."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    first = text.splitlines()[0].split(" (file write failed")[0]
    os_reason = re.search(r"error message = '([^']+)'", text)
    return f"{first} ({os_reason.group(1)})" if os_reason else first


def nested_labels(max_step: int, inner: int) -> np.ndarray:
    """[max_step + 1, 2] (outer, inner) cycle of each step of a nested loop; step 0 (s0) is (-1, -1)."""
    steps = np.arange(max_step + 1)
    labels = np.stack([(steps - 1) // inner, (steps - 1) % inner], axis=1).astype(np.int32)
    labels[0] = -1
    return labels
