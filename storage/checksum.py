"""HDF5's Fletcher-32 chunk checksum, computed in numpy, and the chunk walk that checks stored ones.

Why: flipped bits in states would otherwise be read back as plausible numbers. Every chunked dataset loopscope
writes carries HDF5's Fletcher-32 filter, which HDF5 computes on writes through its pipeline and verifies on every
read. States are mostly written with ``write_direct_chunk``, which bypasses the pipeline, so the writer appends the
same 4 bytes itself (:func:`fletcher32`, byte-exact with ``H5_checksum_fletcher32``); ``loopscope verify`` walks
every stored chunk with :func:`damaged_chunks` without decoding anything. No torch here.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import h5py
import numpy as np

FLETCHER32 = h5py.h5z.FILTER_FLETCHER32
CHECKSUM_BYTES = 4
# The sums are column and row sums of the 16-bit words laid out as rows of _COLS words, taken a block of rows at a
# time so that the block stays in cache for its second pass; numpy's integer reductions widen the words on the fly.
_COLS = 2048  # 16-bit words per row (4 KiB)
_BLOCK_ROWS = 64  # rows per block (256 KiB)
_MOD = 65535
# Each thread's column sums of one block: a fresh array per block came from the allocator every time.
_scratch = threading.local()


def fletcher32(buf) -> int:
    """``H5_checksum_fletcher32`` of ``buf`` (any contiguous buffer): 16-bit big-endian words, an odd last byte
    as the high byte of one more word, both sums in ones' complement mod 65535 (0 only for all-zero data)."""
    data = memoryview(buf).cast("B")
    nbytes = data.nbytes
    if nbytes == 0:
        return 0
    # HDF5 reads big-endian words w = 256 * b0 + b1; the little-endian word v = b0 + 256 * b1 has 256 * v = w
    # (mod 65535), so the sums are taken over v, read as they lie, and scaled at the end. With n words,
    # sum1 = sum(w_i) and sum2 = sum((n - i) * w_i): both follow from total = sum(v_i) and weighted = sum(i * v_i),
    # and only their residues mod 65535 matter (apart from telling all-zero data, whose checksum is 0).
    rows = nbytes // (2 * _COLS)
    total, weighted = _whole_rows(np.frombuffer(data[: rows * _COLS * 2], dtype="<u2").reshape(rows, _COLS))
    start = rows * _COLS  # the words past the last whole row, and an odd last byte: fewer than 2049
    words = np.frombuffer(data[start * 2 : nbytes & ~1], dtype="<u2").astype(np.int64)
    if nbytes & 1:
        words = np.append(words, data[nbytes - 1])  # HDF5's last word is (byte << 8): 256 * byte
    total += int(words.sum())
    weighted += int((np.arange(start, start + words.size, dtype=np.int64) * words).sum())
    if total == 0:
        return 0
    n = start + words.size
    sum1 = total * 256 % _MOD
    sum2 = (n * total - weighted) * 256 % _MOD
    return (((sum2 - 1) % _MOD + 1) << 16) | ((sum1 - 1) % _MOD + 1)


def _whole_rows(x: np.ndarray) -> tuple[int, int]:
    """(sum of v exactly, sum of i * v mod 65535) over the words v of ``x`` [rows, COLS], i counted from its first
    word: word i = r * COLS + c, so sum(i * v) = COLS * sum(r * row_r) + sum(c * col_c)."""
    rows = x.shape[0]
    if rows == 0:
        return 0, 0
    cols = np.zeros(_COLS, np.uint64)  # < rows * 2**16: exact for any buffer that fits in memory
    row_sums = np.empty(rows, np.uint32)  # < COLS * 2**16 = 2**27
    block = _block_sums()
    for r0 in range(0, rows, _BLOCK_ROWS):
        r1 = min(r0 + _BLOCK_ROWS, rows)
        np.add.reduce(x[r0:r1], axis=0, dtype=np.uint32, out=block)  # < BLOCK_ROWS * 2**16
        cols += block
        np.add.reduce(x[r0:r1], axis=1, dtype=np.uint32, out=row_sums[r0:r1])
    total = int(cols.sum())
    col_part = int((np.arange(_COLS, dtype=np.int64) * (cols % _MOD).astype(np.int64)).sum())  # < 2**38
    # residues keep each product below 2**32 and the sum within int64 for up to 2**31 rows (8 TiB)
    r = np.arange(rows, dtype=np.int64) % _MOD
    row_part = int((r * (row_sums % _MOD).astype(np.int64)).sum() % _MOD)
    return total, (col_part + _COLS * row_part) % _MOD


def _block_sums() -> np.ndarray:
    """This thread's [COLS] uint32 column sums of one block."""
    block = getattr(_scratch, "block", None)
    if block is None or block.shape != (_COLS,):
        block = _scratch.block = np.empty(_COLS, np.uint32)
    return block


def stored_value(chunk) -> int:
    """The checksum HDF5 stores after a chunk's payload: its last 4 bytes, little-endian."""
    return int.from_bytes(bytes(memoryview(chunk).cast("B")[-CHECKSUM_BYTES:]), "little")


def has_fletcher32(ds: h5py.Dataset) -> bool:
    """Whether a dataset's filter pipeline ends in Fletcher-32 (HDF5 then checks every chunk it reads)."""
    if ds.chunks is None or ds.is_virtual:
        return False
    plist = ds.id.get_create_plist()
    return any(plist.get_filter(i)[0] == FLETCHER32 for i in range(plist.get_nfilters()))


def dataset_options(shape: tuple[int, ...], enabled: bool = True, limit: int = 1 << 16) -> dict:
    """create_dataset keywords that give a small dataset of ``shape`` the checksum: filters need chunked layout,
    so chunks of at most ``limit`` along the first axis (an empty axis is made growable, since a fixed one may
    not be smaller than its chunk)."""
    if not enabled or len(shape) == 0:
        return {}
    chunks = tuple(max(1, min(int(d), limit if i == 0 else int(d) or 1)) for i, d in enumerate(shape))
    maxshape = tuple(None if d < c else int(d) for d, c in zip(shape, chunks))
    return {"fletcher32": True, "chunks": chunks, "maxshape": maxshape}


@dataclass(frozen=True)
class DamagedChunk:
    """A stored chunk whose checksum does not match its bytes: where it sits in the dataset."""

    offset: tuple[int, ...]  # the chunk's first element along each axis
    shape: tuple[int, ...]  # the chunk's extent, clipped to the dataset's shape
    reason: str = "checksum mismatch"

    def span(self, axis: int) -> tuple[int, int]:
        """(first, last) index the chunk covers along ``axis``."""
        return self.offset[axis], self.offset[axis] + self.shape[axis] - 1


def chunk_count(ds: h5py.Dataset) -> int:
    return int(ds.id.get_num_chunks())


def damaged_chunks(ds: h5py.Dataset, within: tuple[tuple[int, int], ...] | None = None):
    """Yield a :class:`DamagedChunk` for each stored chunk of ``ds`` (Fletcher-32 last in its pipeline) whose
    stored checksum does not match its bytes. ``within``: only chunks meeting these (start, stop) ranges per
    axis. Reads each chunk's raw bytes once; nothing is decompressed."""
    shape = ds.shape
    for i in range(chunk_count(ds)):
        info = ds.id.get_chunk_info(i)
        offset = tuple(int(o) for o in info.chunk_offset)
        extent = tuple(min(c, s - o) for c, s, o in zip(ds.chunks, shape, offset))
        if within is not None and any(o >= b or o + c <= a for o, c, (a, b) in zip(offset, ds.chunks, within)):
            continue
        try:
            _mask, raw = ds.id.read_direct_chunk(offset)
        except (OSError, ValueError, RuntimeError) as exc:
            yield DamagedChunk(offset, extent, f"unreadable ({str(exc).splitlines()[0] if str(exc) else exc})")
            continue
        if len(raw) < CHECKSUM_BYTES:
            yield DamagedChunk(offset, extent, f"only {len(raw)} bytes stored")
        elif fletcher32(memoryview(raw)[:-CHECKSUM_BYTES]) != stored_value(raw):
            yield DamagedChunk(offset, extent)


class ChunkMismatch(Exception):
    """A chunk's bytes do not match its stored checksum (raised by :func:`read_token_block`)."""


def read_token_block(ds: h5py.Dataset, start: int, stop: int, out: np.ndarray) -> bool:
    """Read tokens ``start..stop`` of a states dataset [T, K, H] into ``out`` chunk by chunk, raw, checking each
    chunk's Fletcher-32 here: about 1.3x HDF5's own checked read (which copies each chunk through its pipeline
    and sums it a byte at a time). Only where Fletcher-32 is the sole filter and the block starts on a chunk;
    False (``out`` then holds nothing promised) where this path does not apply, e.g. a chunk never written,
    which HDF5's own read fills, or a contiguous dataset (no chunks to check). Raises :class:`ChunkMismatch` for a
    damaged chunk."""
    if ds.chunks is None or len(ds.chunks) != 3:
        return False
    ct, ck, hidden = ds.chunks
    n_steps = ds.shape[1]
    if start % ct or out.shape != (stop - start, n_steps, hidden) or out.dtype != ds.dtype:
        return False
    if not out.flags.c_contiguous:
        return False
    plist = ds.id.get_create_plist()
    if plist.get_nfilters() != 1 or plist.get_filter(0)[0] != FLETCHER32:
        return False
    nbytes = ct * ck * hidden * ds.dtype.itemsize
    buffer = np.empty(nbytes + CHECKSUM_BYTES, np.uint8)
    chunk = buffer[:nbytes].view(ds.dtype).reshape(ct, ck, hidden)
    for t in range(start, stop, ct):
        rows = min(ct, stop - t)
        for k in range(0, n_steps, ck):
            try:
                mask, raw = ds.id.read_direct_chunk((t, k, 0), out=buffer)
            except (OSError, ValueError, RuntimeError, KeyError):
                return False
            if mask or len(raw) != nbytes + CHECKSUM_BYTES:
                return False
            if fletcher32(buffer[:nbytes]) != stored_value(buffer):
                raise ChunkMismatch((t, k))
            cols = min(ck, n_steps - k)
            out[t - start : t - start + rows, k : k + cols] = chunk[:rows, :cols]
    return True
