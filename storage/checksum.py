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
# The sums are taken over 64-bit words, each holding four 16-bit words: masked into two lanes per 64-bit word (16
# bits of data in each 32-bit half), they add up with numpy's integer loops, no float conversion and no BLAS.
_COLS = 512  # 64-bit words per row of the 2-D view (4 KiB)
_BLOCK_ROWS = 64  # rows masked at a time (256 KiB): the temporaries stay in cache
_GROUP_ROWS = 1 << 16  # rows summed into one set of column sums: each 32-bit half stays below 2**32
_LANES = np.uint64(0x0000FFFF0000FFFF)
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(16)
# The two masked blocks, kept per thread: fresh 256 KiB arrays on every call came from mmap, and their page faults
# (~100 per MiB checksummed) cost as much system time as the sums themselves.
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
    # sum1 = sum(w_i) and sum2 = sum((n - i) * w_i): both follow from total = sum(v_i) and weighted = sum(i * v_i).
    rows = nbytes // (8 * _COLS)
    total = weighted = 0
    for r0 in range(0, rows, _GROUP_ROWS):
        r1 = min(r0 + _GROUP_ROWS, rows)
        block = np.frombuffer(data[r0 * _COLS * 8 : r1 * _COLS * 8], dtype="<u8").reshape(r1 - r0, _COLS)
        s, p = _grouped_sums(block)
        total += s
        weighted += p + 4 * r0 * _COLS * s  # the group's words start at word 4 * r0 * COLS
    start = rows * _COLS * 4  # the words past the last whole row, and an odd last byte: a few thousand at most
    words = np.frombuffer(data[start * 2 : nbytes & ~1], dtype="<u2").astype(np.int64)
    if nbytes & 1:
        words = np.append(words, data[nbytes - 1])  # HDF5's last word is (byte << 8): 256 * byte
    total += int(words.sum())
    weighted += int((np.arange(start, start + words.size, dtype=np.int64) * words).sum())
    if total == 0:
        return 0
    n = start + words.size
    sum1 = total * 256 % 65535
    sum2 = (n * total - weighted) * 256 % 65535
    return (((sum2 - 1) % 65535 + 1) << 16) | ((sum1 - 1) % 65535 + 1)


def _grouped_sums(block: np.ndarray) -> tuple[int, int]:
    """(sum of v, sum of i * v) over the 16-bit words v of ``block`` [rows <= GROUP_ROWS, COLS] of 64-bit words,
    i counted from the block's first word. Word i = 4 q + l sits in lane l of 64-bit word q = r * COLS + c; lanes 0
    and 2 (``a``) and 1 and 3 (``b``) are masked into the halves of one 64-bit word each, whose column and row sums
    give every term: sum(i * v) = 4 * (COLS * sum(r * row_r) + sum(c * col_c)) + sum(l * lane_l)."""
    rows = block.shape[0]
    col_a = np.zeros(_COLS, np.uint64)
    col_b = np.zeros(_COLS, np.uint64)
    row_a = np.empty(rows, np.uint64)
    row_b = np.empty(rows, np.uint64)
    a, b = _masked_blocks()
    for r0 in range(0, rows, _BLOCK_ROWS):
        r1 = min(r0 + _BLOCK_ROWS, rows)
        x, ka, kb = block[r0:r1], a[: r1 - r0], b[: r1 - r0]
        np.bitwise_and(x, _LANES, out=ka)
        np.right_shift(x, _SHIFT, out=kb)
        np.bitwise_and(kb, _LANES, out=kb)
        col_a += ka.sum(axis=0)
        col_b += kb.sum(axis=0)
        ka.sum(axis=1, out=row_a[r0:r1])
        kb.sum(axis=1, out=row_b[r0:r1])
    lanes = [(s & _LOW).astype(np.int64) for s in (col_a, col_b)] + [
        (s >> np.uint64(32)).astype(np.int64) for s in (col_a, col_b)
    ]
    cols = lanes[0] + lanes[1] + lanes[2] + lanes[3]  # < 2**34 each: times c < 2**9, summed, within int64
    row = sum((s & _LOW).astype(np.int64) + (s >> np.uint64(32)).astype(np.int64) for s in (row_a, row_b))
    total = int(cols.sum())
    lane_sums = [int(s.sum()) for s in lanes]  # lanes 0, 1, 2, 3
    weighted = 4 * (_COLS * int((np.arange(rows, dtype=np.int64) * row).sum()) + int((np.arange(_COLS) * cols).sum()))
    return total, weighted + lane_sums[1] + 2 * lane_sums[2] + 3 * lane_sums[3]


def _masked_blocks() -> tuple[np.ndarray, np.ndarray]:
    """This thread's two [BLOCK_ROWS, COLS] scratch blocks."""
    blocks = getattr(_scratch, "blocks", None)
    if blocks is None or blocks[0].shape != (_BLOCK_ROWS, _COLS):
        blocks = _scratch.blocks = tuple(np.empty((_BLOCK_ROWS, _COLS), np.uint64) for _ in range(2))
    return blocks


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
    which HDF5's own read fills. Raises :class:`ChunkMismatch` for a damaged chunk."""
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
