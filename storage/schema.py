"""The capture file's layout: the contract between the capture side and the offline side.

The index file (``run.h5``) holds the header and the readout norm; each run is its own file (see
``run_files.py``), linked into the index as ``/runs/NNNNNN`` once the capture closes cleanly::

    /                         attrs: format, format_version, versions, model, config JSON, loop adapter, options
    /readout/                 attrs: kind (rmsnorm | layernorm | identity | none), eps, weight_offset; weight [, bias]
    /runs/000000/             one run per batch row of one forward() or generate() call (root of its run file)
        token_ids   [T]       int64, from the forward's input_ids (-1 when the model got embeddings only)
        token_bytes [N] + token_ends [T]  the tokens' utf-8 text, concatenated, and where each ends (tokenizer given)
        attention_mask [T]    int8, as the caller passed it (1 when none was passed)
        positions   [T]       int64, the token's position in the sequence (cache_position / position_ids)
        forward_index [T]     int32, which forward call of the run computed the token (0 = prefill)
        loops/<name>/
            states    [T, K, H]   K = max steps + 1; states[t, 0] = s0, states[t, k] = state after iteration k
            num_steps [T]         int32, iterations the token actually ran (entries past it are fill)
            step_labels [K, D]    optional: nested-loop labels, e.g. (h, l) for HRM

States are chunked as (tokens, steps, H) blocks, so one token's trajectory and one iteration across all tokens are
both cheap to read. bfloat16 states are stored as their raw 16-bit patterns (uint16) with ``logical_dtype`` set to
``bfloat16``; the reader widens them to float32, which is exact.
"""

from __future__ import annotations

import json
import math

import h5py
import numpy as np

FORMAT_NAME = "loopscope-capture"
RUN_FORMAT_NAME = "loopscope-run"
#: Run ``call`` values of one pass over the prompt (every token is prompt): a forward(), and Huginn's token-by-token
#: prefill. Any other call (generate(), a family's decoder called by name) decodes after its first forward.
PREFILL_CALLS = ("forward", "forward_with_adaptive_compute")
FORMAT_VERSION = 1

# The HDF5 object versions every file is written with (h5py's ``libver``): HDF5 1.10's, so the tools and libraries of
# 1.10 on (h5dump/h5ls 1.10 as Debian and Ubuntu ship them, HDFView 3.1 on) read every part of every file. Low bound
# v110: superblock v3 and the 1.10 chunk indexes for resizable datasets. High bound v110 too: "latest" let HDF5
# 1.12/1.14 write bools (HDF5 enums) in a datatype version 1.10 cannot read ("error getting attribute information"
# in h5dump), and HDF5 2.0 write every filtered chunked dataset (all carry Fletcher-32) in a layout version no HDF5
# before 2.0 reads. This is the files' HDF5 encoding, not loopscope's layout: FORMAT_VERSION does not change with it.
LIBVER = ("v110", "v110")

RUNS = "runs"
READOUT = "readout"
LOOPS = "loops"
SIGNALS = "signals"  # loops/<loop>/signals/<name>: [T, K] float32 per-token scalars, NaN where not recorded

# Fill for steps a token never ran: NaN, so analysis cannot mistake it for a state.
BF16_NAN_BITS = np.uint16(0x7FC0)

# A chunk of states aims at this many bytes: whole-chunk writes of 1 MiB run at ~2x the rate of 64 KiB ones (fewer
# HDF5 calls and index entries), while one token's trajectory or one iteration across tokens still reads a few MiB.
TARGET_CHUNK_BYTES = 1 << 20
MIN_CHUNK_STEPS = 4
MAX_CHUNK_STEPS = 16
DEFAULT_CHUNK_STEPS = 4  # when the number of steps is not known yet: little padding whatever it turns out to be
MIN_CHUNK_TOKENS = 16


def text(value) -> np.ndarray:
    """A string attribute as a fixed-length HDF5 string marked UTF-8 (``H5T_CSET_UTF8``; h5py reads it back as
    bytes). Variable-length strings live in HDF5's global heap, and a damaged global heap can make HDF5 loop forever
    on read; fixed-length strings sit in the object header. Bytes (a string read back from a file) are taken as
    UTF-8, undecodable bytes replaced, so what is stored is always valid UTF-8."""
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", "replace")
    data = str(value).encode("utf-8")
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(len(data), 1)))


def restored(value):
    """An attribute value read from a file, ready to be stored again: text (fixed- or variable-length, ASCII- or
    UTF-8-marked, as files of every loopscope version hold it) as :func:`text`, anything else unchanged."""
    decoded = as_text(value)
    return value if decoded is None else text(decoded)


def attrs_to_store(values: dict) -> dict:
    """Attribute values ready for h5py: strings as :func:`text`, lists and dicts as JSON text under ``*_json``."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (dict, list, tuple)):
            out[f"{key}_json"] = text(json.dumps(value, default=str))
        elif value is None:
            out[key] = text("")
        elif isinstance(value, str):
            out[key] = text(value)  # also turns str subclasses (torch's TorchVersion) into plain text
        else:
            out[key] = value
    return out


def as_text(value) -> str | None:
    """An attribute read back (fixed or variable-length string, bytes or str) as str; None for anything else."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    return None


def text_or(value, fallback):
    """An attribute's text (fixed- or variable-length string), or ``fallback`` when it holds no text."""
    decoded = as_text(value)
    return fallback if decoded is None else decoded


def run_name(index: int) -> str:
    """The group name of run ``index`` (zero-padded so names sort in capture order)."""
    return f"{index:06d}"


def stored_numpy_dtype(logical: str) -> np.dtype:
    """The numpy dtype that holds a tensor of ``logical`` dtype losslessly in HDF5."""
    return np.dtype(
        {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32, "float64": np.float64}[logical]
    )


def fill_value(logical: str):
    """NaN in the stored representation of ``logical``."""
    return BF16_NAN_BITS if logical == "bfloat16" else np.nan


def state_chunks(
    hidden: int,
    itemsize: int,
    steps: int | None = None,
    tokens: int | None = None,
    more_tokens: bool = True,
    max_depth: int | None = None,
) -> tuple[int, int, int]:
    """Chunk shape (tokens, steps, hidden) for a states dataset.

    A row of ``hidden`` values is never split. Rows are grouped into a block of tokens x steps of about
    TARGET_CHUNK_BYTES, about square (at most MAX_CHUNK_STEPS deep), so that reading one token's trajectory and
    reading one iteration across tokens cost about the same. ``steps``, the number of stored steps when known
    (s0 included), picks a depth that divides it or nearly: HDF5 stores whole chunks, so a depth of 16 for 33
    steps would store 48. ``tokens``, the tokens of the first write, caps the token extent: a short run does not
    store mostly empty 1 MiB chunks. When ``more_tokens`` may follow (generate), the cap is at least
    MIN_CHUNK_TOKENS, rounded up to a power of two; otherwise the tokens are cut into blocks of a size that divides them
    (512 tokens under a limit of 36: 16 blocks of 32, not 15 of 35 with a last one of 22), else into the fewest
    blocks of equal size, so the last chunk is not mostly empty.
    ``max_depth`` caps the depth: the capture stages a chunk's steps for all of a forward's tokens in one host slab
    (so chunks are written straight from it), and a long prefill's slab must stay within the buffer budget.
    """
    row = max(hidden * itemsize, 1)
    rows = max(TARGET_CHUNK_BYTES // row, 1)
    depth = max(min(int(math.sqrt(rows)), MAX_CHUNK_STEPS, max_depth or MAX_CHUNK_STEPS), 1)
    if steps:
        candidates = range(max(min(MIN_CHUNK_STEPS, steps, depth), 1), depth + 1)
        depth = min(candidates, key=lambda d: (-(-steps // d) * d - steps, -d))
    else:
        depth = min(depth, DEFAULT_CHUNK_STEPS)
    extent = max(rows // depth, 1)
    if tokens and more_tokens:
        extent = min(extent, max(MIN_CHUNK_TOKENS, 1 << (int(tokens) - 1).bit_length()))
    elif tokens:  # all the run's tokens: the largest divisor of them in the top quarter under the limit (every
        # chunk is then whole in the capture's slab and none needs assembling), else the fewest equal blocks
        tokens = int(tokens)
        divisors = [e for e in range(extent, max(extent * 3 // 4, 1) - 1, -1) if tokens % e == 0]
        extent = divisors[0] if divisors else -(-tokens // -(-tokens // extent))
    return extent, depth, hidden


def dataset_chunks(ds) -> tuple[int, ...]:
    """The chunk shape reads should align with: the dataset's own, or for a merged (virtual) dataset the chunks of
    the source it maps (recorded by ``merge`` as ``source_chunks``); the whole shape when neither is known. Every
    entry is at least 1, since readers divide by it.

    ``source_chunks`` comes from the file, so it is only a hint: one that is not a positive integer per axis is
    ignored (a good file stays readable); an entry past the axis's length is cut to it (a generate run of 10 tokens
    has chunks of 16)."""
    shape = tuple(max(int(n), 1) for n in ds.shape)
    if ds.chunks:
        return tuple(int(c) for c in ds.chunks)
    try:
        stored = ds.attrs.get("source_chunks")
    except (OSError, TypeError, ValueError):  # a type h5py cannot read back
        stored = None
    if stored is not None:
        hint = np.asarray(stored)
        if hint.dtype.kind in "iu" and hint.shape == (len(shape),) and bool(np.all(hint >= 1)):
            return tuple(min(int(c), n) for c, n in zip(hint.tolist(), shape))
    return shape


def stored_step_iterations(iterations: np.ndarray, stride: int, n_slots: int) -> np.ndarray:
    """[T, K] the iteration stored step k holds for tokens that ran ``iterations``: ``min(k * stride, last)``
    (with ``step_stride`` the last slot holds each token's final iteration, on the stride or not)."""
    k = np.arange(n_slots)[None, :]
    return np.minimum(k * stride, np.asarray(iterations, dtype=np.int64)[:, None])
