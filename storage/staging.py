"""Whole-chunk writes of a states dataset: the writer assembles chunks itself and writes each one once.

Why: through HDF5's chunk cache, every write is gathered into cached chunks and written out later, at HDF5's
pace (~1.4 GB/s here with 64 KiB chunks), and a chunk still dirty in the cache when a write fails (disk full) is
flushed again when the library shuts down, which could crash the process at exit. Here the chunk cache is off
(``rdcc_nbytes=0``): a write that fills whole chunks goes straight to the file (``write_direct_chunk``, which skips
the cache and the filter pipeline; compressed datasets take a plain chunk-aligned write instead), and rows of a
chunk that arrive in pieces -- decoding brings one token per forward, a prefill brings a few steps at a time -- are
gathered in a host buffer until the chunk is full, or until its tokens are finished (no more states can come for
them), and then written whole. Unwritten rows of a written chunk hold the fill value (NaN), as HDF5 would.

Memory: every buffer comes from one :class:`ChunkBudget` per writer. When it is used up, rows for a new chunk go
through HDF5's own partial write (still uncached, about 1 GB/s here) and that chunk stays on that path until its
tokens are finished, so memory stays within the budget however long the capture or large the batch.
"""

from __future__ import annotations

import h5py
import numpy as np


class ChunkBudget:
    """Host memory for chunks being assembled, shared by every open run of one writer; freed buffers are kept
    for reuse (a long decode recycles the same few) and count against the limit until dropped."""

    def __init__(self, limit_bytes: int):
        self.limit = int(limit_bytes)
        self.held = 0  # bytes in buffers, in use or free
        self.peak = 0
        self._free: dict[tuple, list[np.ndarray]] = {}

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
        """A buffer of ``shape``/``dtype`` (contents undefined), or None when the budget is used up."""
        key = (shape, np.dtype(dtype))
        free = self._free.get(key)
        if free:
            return free.pop()
        nbytes = int(np.prod(shape)) * key[1].itemsize
        while self.held + nbytes > self.limit and self._drop_one():
            pass
        if self.held + nbytes > self.limit:
            return None
        self.held += nbytes
        self.peak = max(self.peak, self.held)
        return np.empty(shape, dtype=dtype)

    def give(self, buffer: np.ndarray) -> None:
        self._free.setdefault((buffer.shape, buffer.dtype), []).append(buffer)

    def clear(self) -> None:
        """Drop the free buffers (buffers still in use are dropped by their stagers)."""
        while self._drop_one():
            pass

    def forget(self, buffer: np.ndarray) -> None:
        """A buffer in use that will not come back (its run was abandoned)."""
        self.held -= buffer.nbytes

    def _drop_one(self) -> bool:
        for buffers in self._free.values():
            if buffers:
                self.held -= buffers.pop().nbytes
                return True
        return False


class _Chunk:
    __slots__ = ("data", "filled", "count")

    def __init__(self, data: np.ndarray, fill):
        data[...] = fill
        self.data = data
        self.filled = np.zeros(data.shape[:2], dtype=bool)  # which (token, step) rows hold a state
        self.count = 0


class ChunkStager:
    """Assembles the chunks of one states dataset [T, K, H] (chunked (ct, ck, H), chunk cache off)."""

    def __init__(self, dataset: h5py.Dataset, fill, budget: ChunkBudget, *, filtered: bool = False):
        self.ds = dataset
        self.fill = fill
        self.budget = budget
        self.ct, self.ck, self.hidden = dataset.chunks
        self.direct = not filtered  # no filter pipeline: a chunk's bytes are the array's bytes
        self.open: dict[tuple[int, int], _Chunk] = {}
        self.uncached: set[tuple[int, int]] = set()  # chunks on HDF5's partial-write path (budget was used up)
        self.final_blocks = 0  # token blocks before this one are written; late rows for them must not replace them
        self.chunks_written = 0

    def write(self, offset: int, step: int, block: np.ndarray) -> None:
        """Rows ``offset..`` x steps ``step..`` of ``block`` [t, k, H]; the dataset already covers them."""
        ct, ck = self.ct, self.ck
        t_end, k_end = offset + block.shape[0], step + block.shape[1]
        for ti in range(offset // ct, (t_end - 1) // ct + 1):
            a0, a1 = max(offset, ti * ct), min(t_end, (ti + 1) * ct)
            for ki in range(step // ck, (k_end - 1) // ck + 1):
                b0, b1 = max(step, ki * ck), min(k_end, (ki + 1) * ck)
                piece = block[a0 - offset : a1 - offset, b0 - step : b1 - step]
                key = (ti, ki)
                if key in self.uncached or ti < self.final_blocks:
                    self._partial_write(a0, a1, b0, b1, piece)
                    continue
                chunk = self.open.get(key)
                whole = a1 - a0 == ct and b1 - b0 == ck
                if chunk is None and whole:
                    self._write_whole(key, piece)
                    continue
                if chunk is None:
                    buffer = self.budget.take((ct, ck, self.hidden), self.ds.dtype)
                    if buffer is None:  # over budget: HDF5's own partial write, for this chunk's remaining rows too
                        self.uncached.add(key)
                        self._partial_write(a0, a1, b0, b1, piece)
                        continue
                    chunk = self.open[key] = _Chunk(buffer, self.fill)
                ra, rb = a0 - ti * ct, b0 - ki * ck
                chunk.data[ra : ra + a1 - a0, rb : rb + b1 - b0] = piece
                rows = chunk.filled[ra : ra + a1 - a0, rb : rb + b1 - b0]
                chunk.count += rows.size - int(rows.sum())
                rows[...] = True
                if chunk.count == ct * ck:
                    self._flush(key)

    def finish_tokens(self, end: int) -> None:
        """Tokens before ``end`` will get no more states: write every chunk that holds only such tokens."""
        last_block = end // self.ct  # chunks of token blocks before this one are final
        for key in [k for k in self.open if k[0] < last_block]:
            self._flush(key)
        if self.uncached:
            self.uncached = {k for k in self.uncached if k[0] >= last_block}
        self.final_blocks = max(self.final_blocks, last_block)

    def flush_all(self) -> None:
        """Write every chunk still being assembled (the run ends: its last partial chunks)."""
        for key in list(self.open):
            self._flush(key)
        self.uncached.clear()
        self.final_blocks = 1 << 62

    def drop(self) -> None:
        """Forget unwritten chunks (the run was abandoned after a failure)."""
        for chunk in self.open.values():
            self.budget.forget(chunk.data)
        self.open.clear()
        self.uncached.clear()

    def _partial_write(self, a0: int, a1: int, b0: int, b1: int, piece: np.ndarray) -> None:
        """Rows through HDF5's own (uncached) partial write; padding rows past the step extent are left out."""
        b1 = min(b1, self.ds.shape[1])
        if b1 > b0:
            self.ds[a0:a1, b0:b1] = piece[:, : b1 - b0]

    def _flush(self, key: tuple[int, int]) -> None:
        chunk = self.open.pop(key)
        try:
            self._store(key, chunk.data)
        finally:
            self.budget.give(chunk.data)

    def _write_whole(self, key: tuple[int, int], piece: np.ndarray) -> None:
        """A chunk covered by one write: written from the slab itself when its rows lie there in chunk order
        (the slab's steps are the chunk's), else copied once into a contiguous buffer and written."""
        if self.direct and piece.flags.c_contiguous:
            self._store(key, piece)
            return
        buffer = self.budget.take((self.ct, self.ck, self.hidden), self.ds.dtype)
        if buffer is None:
            self._store(key, np.ascontiguousarray(piece))
            return
        try:
            np.copyto(buffer, piece)
            self._store(key, buffer)
        finally:
            self.budget.give(buffer)

    def _store(self, key: tuple[int, int], data: np.ndarray) -> None:
        t0, k0 = key[0] * self.ct, key[1] * self.ck
        if self.direct:
            self.ds.id.write_direct_chunk((t0, k0, 0), data)
        else:  # the filter pipeline compresses it; clipped to the extent (edge chunks)
            t1, k1 = min(t0 + self.ct, self.ds.shape[0]), min(k0 + self.ck, self.ds.shape[1])
            self.ds[t0:t1, k0:k1] = data[: t1 - t0, : k1 - k0]
        self.chunks_written += 1
