"""Whole-chunk writes of a states dataset: the writer assembles chunks itself and writes each one once.

Why: through HDF5's chunk cache, every write is gathered into cached chunks and written out later, at HDF5's
pace (~1.4 GB/s here with 64 KiB chunks), and a chunk still dirty in the cache when a write fails (disk full) is
flushed again when the library shuts down, which could crash the process at exit. Here the chunk cache is off
(``rdcc_nbytes=0``): a write that fills whole chunks goes straight to the file (``write_direct_chunk``, which skips
the cache and the filter pipeline; compressed datasets take a plain chunk-aligned write instead), and rows of a
chunk that arrive in pieces -- decoding brings one token per forward, a prefill brings a few steps at a time -- are
gathered in a host buffer until the chunk is full, or until its tokens are finished (no more states can come for
them), and then written whole. Unwritten rows of a written chunk hold the fill value (NaN), as HDF5 would.

Decoding brings one token per forward, its steps laid out in the chunk depth: such a token goes into one buffer
holding every chunk of its block of tokens (:class:`_TokenRow`, [chunk columns, tokens, depth, H]) in one or two
copies, rather than a piece per chunk with the bookkeeping of each; the block's chunks are written whole when its
tokens are finished.

Memory: every buffer comes from one :class:`ChunkBudget` per writer. When it is used up, rows for a new chunk go
through HDF5's own partial write (still uncached, about 1 GB/s here) and that chunk stays on that path until its
tokens are finished, so memory stays within the budget however long the capture or large the batch.
"""

from __future__ import annotations

import h5py
import numpy as np

from ..checksum import CHECKSUM_BYTES, fletcher32


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
        # 4 spare bytes past the end: the last chunk of a buffer gets its checksum appended in place (see _store)
        return np.empty(nbytes + CHECKSUM_BYTES, np.uint8)[:nbytes].view(key[1]).reshape(shape)

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


class _TokenRow:
    """Every chunk of one block of tokens, [columns, ct, ck, H], filled a token at a time (decoding)."""

    __slots__ = ("data", "touched")

    def __init__(self, data: np.ndarray, fill):
        data[...] = fill
        self.data = data
        self.touched = 0  # chunk columns any token reached; the ones past it hold nothing and are not written


class ChunkStager:
    """Assembles the chunks of one states dataset [T, K, H] (chunked (ct, ck, H), chunk cache off)."""

    def __init__(
        self, dataset: h5py.Dataset, fill, budget: ChunkBudget, *, filtered: bool = False, checksum: bool = False
    ):
        self.ds = dataset
        self.fill = fill
        self.budget = budget
        self.ct, self.ck, self.hidden = dataset.chunks
        self.direct = not filtered  # no filter but Fletcher-32: a chunk's bytes are the array's bytes (+ checksum)
        self.checksum = checksum  # the dataset has Fletcher-32: direct writes append its 4 bytes themselves
        self._spare: np.ndarray | None = None  # chunk + checksum, for a chunk with no spare bytes behind it
        self.open: dict[tuple[int, int], _Chunk] = {}
        self.uncached: set[tuple[int, int]] = set()  # chunks on HDF5's partial-write path (budget was used up)
        self.final_blocks = 0  # token blocks before this one are written; late rows for them must not replace them
        self.chunks_written = 0
        self.rows: dict[int, _TokenRow] = {}  # token block -> its chunks, filled by write_token
        self.piecewise: set[int] = set()  # token blocks written through write(): never a row (one way per block)

    def write_token(self, offset: int, step: int, base: int, planes: np.ndarray, steps: int) -> bool:
        """One token's stored steps ``step .. step + steps - 1``, ``planes`` [P, ck, H] in this dataset's chunk depth
        from ``base`` (a chunk boundary): copied into its block's :class:`_TokenRow`. False (nothing done) when the
        token has to take :meth:`write` instead: its block's chunks are assembled or written that way already (a
        block is filled one way only), its block is finished, the dataset is compressed, or the budget has no
        room."""
        ct, ck = self.ct, self.ck
        ti, ra = divmod(offset, ct)
        end = step + steps
        c0, c1 = base // ck, -(-end // ck)
        if not self.direct or ti < self.final_blocks or base % ck or ti in self.piecewise:
            return False
        row = self._row(ti, c1)
        if row is None:
            return False
        lo, hi = step - base, end - base  # rows of the planes, counted across them
        if lo == 0:  # from the first plane's start: its whole planes in one copy, then the last one's first rows
            full = hi // ck
            row.data[c0 : c0 + full, ra] = planes[:full]
            if hi % ck:
                row.data[c0 + full, ra, : hi % ck] = planes[full, : hi % ck]
        else:  # a later part of a token's steps (an earlier slab of its forward was full): plane by plane
            for p in range(lo // ck, c1 - c0):
                r0, r1 = max(lo - p * ck, 0), min(hi - p * ck, ck)
                row.data[c0 + p, ra, r0:r1] = planes[p, r0:r1]
        row.touched = max(row.touched, c1)
        return True

    def _row(self, ti: int, columns: int) -> _TokenRow | None:
        """Block ``ti``'s row of chunks, at least ``columns`` wide (grown when a token runs deeper than the ones
        before); None when the budget has no room (a row that cannot grow is written as it is, first)."""
        row = self.rows.get(ti)
        if row is not None and row.data.shape[0] >= columns:
            return row
        width = max(columns, -(-self.ds.shape[1] // self.ck))
        buffer = self.budget.take((width, self.ct, self.ck, self.hidden), self.ds.dtype)
        if buffer is None:
            if row is not None:
                self._flush_row(ti, early=True)
            return None
        grown = self.rows[ti] = _TokenRow(buffer, self.fill)
        if row is not None:
            grown.data[: row.data.shape[0]] = row.data
            grown.touched = row.touched
            self.budget.give(row.data)
        return grown

    def _flush_row(self, ti: int, early: bool = False) -> None:
        """Write block ``ti``'s touched chunks whole. ``early``: its tokens are not finished, so rows that still
        come for these chunks go through HDF5's partial write instead of replacing them."""
        row = self.rows.pop(ti)
        try:
            for ki in range(row.touched):
                self._store((ti, ki), row.data[ki])
                if early:
                    self.uncached.add((ti, ki))
        finally:
            self.budget.give(row.data)

    def write(self, offset: int, step: int, block: np.ndarray) -> None:
        """Rows ``offset..`` x steps ``step..`` of ``block`` [t, k, H]; the dataset already covers them."""
        ct, ck = self.ct, self.ck
        t_end, k_end = offset + block.shape[0], step + block.shape[1]
        for ti in range(offset // ct, (t_end - 1) // ct + 1):
            if ti in self.rows:  # filled token by token so far: written now, the rest of its rows piece by piece
                self._flush_row(ti, early=True)
            self.piecewise.add(ti)
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
        for ti in [t for t in self.rows if t < last_block]:
            self._flush_row(ti)
        if self.uncached:
            self.uncached = {k for k in self.uncached if k[0] >= last_block}
        if self.piecewise:
            self.piecewise = {t for t in self.piecewise if t >= last_block}
        self.final_blocks = max(self.final_blocks, last_block)

    def flush_all(self) -> None:
        """Write every chunk still being assembled (the run ends: its last partial chunks)."""
        for key in list(self.open):
            self._flush(key)
        for ti in list(self.rows):
            self._flush_row(ti)
        self.uncached.clear()
        self.piecewise.clear()
        self.final_blocks = 1 << 62

    def drop(self) -> None:
        """Forget unwritten chunks (the run was abandoned after a failure)."""
        for chunk in self.open.values():
            self.budget.forget(chunk.data)
        for row in self.rows.values():
            self.budget.forget(row.data)
        self.open.clear()
        self.rows.clear()
        self.piecewise.clear()
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
        if self.direct and self.checksum:
            self._write_checksummed((t0, k0, 0), data)
        elif self.direct:
            self.ds.id.write_direct_chunk((t0, k0, 0), data)
        else:  # the filter pipeline compresses it; clipped to the extent (edge chunks)
            t1, k1 = min(t0 + self.ct, self.ds.shape[0]), min(k0 + self.ck, self.ds.shape[1])
            self.ds[t0:t1, k0:k1] = data[: t1 - t0, : k1 - k0]
        self.chunks_written += 1

    def _write_checksummed(self, offsets: tuple[int, int, int], data: np.ndarray) -> None:
        """A direct chunk write bypasses HDF5's filters, so the Fletcher-32 HDF5 would append is appended here.
        No copy where the 4 bytes past the chunk belong to the same buffer (the next chunk of a slab, or the
        spare bytes every staging buffer has): they are set to the checksum for the write and put back after.
        Only the writer thread touches a slab while it is queued, so nothing sees them in between."""
        nbytes = data.nbytes
        value = np.array([fletcher32(data)], dtype="<u4").view(np.uint8)
        window = _window(data, nbytes + CHECKSUM_BYTES)
        if window is None:
            if self._spare is None or self._spare.size != nbytes + CHECKSUM_BYTES:
                self._spare = np.empty(nbytes + CHECKSUM_BYTES, np.uint8)
            window = self._spare
            window[:nbytes] = data.reshape(-1).view(np.uint8)
            window[nbytes:] = value
            self.ds.id.write_direct_chunk(offsets, window)
            return
        saved = window[nbytes:].copy()
        window[nbytes:] = value
        try:
            self.ds.id.write_direct_chunk(offsets, window)
        finally:
            window[nbytes:] = saved


def _window(data: np.ndarray, nbytes: int) -> np.ndarray | None:
    """A writable uint8 view of ``nbytes`` from the start of C-contiguous ``data`` (extending past it into the
    array it is a view of), or None when its memory ends sooner."""
    base = data
    while isinstance(base.base, np.ndarray):
        base = base.base
    if not (data.flags.c_contiguous and base.flags.c_contiguous and base.flags.writeable):
        return None
    start = data.ctypes.data - base.ctypes.data
    if start < 0 or start + nbytes > base.nbytes:
        return None
    return base.reshape(-1).view(np.uint8)[start : start + nbytes]
