"""HDF5's Fletcher-32 chunk checksum, computed in numpy, and the chunk walk that checks stored ones.

Why: flipped bits in states would otherwise be read back as plausible numbers. Every chunked dataset loopscope
writes carries HDF5's Fletcher-32 filter, which HDF5 computes on writes through its pipeline and verifies on every
read. States are mostly written with ``write_direct_chunk``, which bypasses the pipeline, so the writer appends the
same 4 bytes itself (:func:`fletcher32`, byte-exact with ``H5_checksum_fletcher32``); ``loopscope verify`` walks
every stored chunk with :func:`damaged_chunks` without decoding anything. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

FLETCHER32 = h5py.h5z.FILTER_FLETCHER32
CHECKSUM_BYTES = 4
_ROW = 4096  # words per row: a row's sums (< 4096 * 65535 * 4096 < 2**53) stay exact in float64
_BLOCK_ROWS = 64  # rows converted to float64 at a time (2 MiB): stays in cache, no chunk-sized temporary
_WEIGHTS = np.stack([np.ones(_ROW), np.arange(_ROW, dtype=np.float64)], axis=1)


def fletcher32(buf) -> int:
    """``H5_checksum_fletcher32`` of ``buf`` (any contiguous buffer): 16-bit big-endian words, an odd last byte
    as the high byte of one more word, both sums in ones' complement mod 65535 (0 only for all-zero data)."""
    data = memoryview(buf).cast("B")
    nbytes = data.nbytes
    if nbytes == 0:
        return 0
    even = nbytes & ~1
    # HDF5 reads big-endian words w = 256 * b0 + b1; the little-endian word v = b0 + 256 * b1 has 256 * v = w
    # (mod 65535), and converting it to float64 needs no byte swap: sums are taken over v and scaled at the end
    words = np.frombuffer(data[:even], dtype="<u2")
    n = words.size + (nbytes & 1)
    rows = -(-n // _ROW)
    sums = np.empty((rows, 2))
    full = words.size // _ROW  # rows taken straight from the buffer; the last partial one is padded with zeros
    for r0 in range(0, full, _BLOCK_ROWS):
        r1 = min(r0 + _BLOCK_ROWS, full)
        block = words[r0 * _ROW : r1 * _ROW].astype(np.float64).reshape(r1 - r0, _ROW)
        np.matmul(block, _WEIGHTS, out=sums[r0:r1])
    if rows > full:
        tail = np.zeros(_ROW)
        rest = words[full * _ROW :]
        tail[: rest.size] = rest
        if nbytes & 1:
            tail[rest.size] = data[nbytes - 1]  # HDF5's last word is (byte << 8): 256 * byte
        sums[full] = tail @ _WEIGHTS
    if not sums[:, 0].any():
        return 0
    row_sum = sums[:, 0].astype(np.int64) % 65535 * 256 % 65535
    weighted = sums[:, 1].astype(np.int64) % 65535 * 256 % 65535
    # word i of the whole buffer counts n - i times in sum2: row r's words count (n - r * ROW - j) times
    coef = (n - np.arange(rows, dtype=np.int64) * _ROW) % 65535
    sum1 = int(row_sum.sum())
    sum2 = int((coef * row_sum % 65535).sum() - weighted.sum())
    return (((sum2 - 1) % 65535 + 1) << 16) | ((sum1 - 1) % 65535 + 1)


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
