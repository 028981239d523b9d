"""Choosing the fixed point s* that every iteration is measured against.

The Huginn paper measures each token's distance to a state computed with many more iterations (128) than the run
itself; without such a run, a token's own last state is the usual stand-in. Both are supported, plus a run in
another capture file, named ``"other.h5"`` (its first complete run), ``"other.h5:3"`` (its run number 3) or
``"other.h5:-1"`` (its last).
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass

import numpy as np

from ..errors import LoopscopeError
from ..storage.reader import CaptureFile, Run

SPACES = ("auto", "readout", "state")


@dataclass
class Reference:
    """s* for each token of a run: ``states`` [T, H] in the analysis space, or None for "each token's last state"."""

    states: np.ndarray | None
    label: str  # for titles and CSV headers, e.g. "final" or "run 3 (128 steps)"


def resolve_space(run: Run, space: str) -> str:
    """'auto' -> 'readout' when the capture stored a readout norm, else 'state'."""
    if space not in SPACES:
        raise LoopscopeError(f"space={space!r} is not one of {', '.join(SPACES)}")
    if space == "auto":
        return "state" if run.capture.readout.kind == "none" else "readout"
    return space


def space_fn(run: Run, space: str):
    """The map from stored states to the analysis space: the readout norm (float64), or the identity."""
    if space == "state":
        return stored_values
    readout = run.capture.readout
    if readout.kind == "none":
        raise LoopscopeError(
            f"{run.capture.path} stores no readout norm for this model; use space='state' for the raw latent state"
        )
    return readout


def stored_values(x: np.ndarray) -> np.ndarray:
    """Decoded states as they are, in at least float32 (float16 widens exactly): the state space's measures need
    no float64 copy, since differences of float32 numbers near convergence are exact (``measures.block_measures``)."""
    return np.asarray(x, dtype=np.result_type(x.dtype, np.float32))


def parse_reference(text: str) -> str | int:
    """CLI spelling -> API value: 'final', a run index ('3'), or a file ('ref.h5' / 'ref.h5:3') kept as text."""
    text = text.strip()
    if text == "final":
        return text
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def split_file_run(text: str) -> tuple[str, int | None]:
    """``"file.h5:N"`` -> (file, N), N negative counting back from the last run as ``--run`` does; ``"file.h5"``
    (or a file whose own name ends in ``:N``) -> (file, None): its first complete run."""
    head, sep, tail = text.rpartition(":")
    if sep and re.fullmatch(r"-?[0-9]+", tail) and not os.path.exists(text):
        return head, int(tail)
    return text, None


def open_reference_run(run: Run, reference, stack: contextlib.ExitStack, name: str = "reference") -> Run | None:
    """The run that holds s*, or None for ``"final"``. Files opened here are closed by ``stack``. ``name``: the
    option the value came from, for messages (``plot --kind compare`` reads ``--other`` through here)."""
    if isinstance(reference, Run):
        return reference
    if isinstance(reference, (int, np.integer)) and not isinstance(reference, bool):
        return run.capture.run(int(reference))
    if isinstance(reference, (str, os.PathLike)):
        text = os.fspath(reference)
        if text == "final":
            return None
        path, index = split_file_run(text)
        if not os.path.exists(path):
            final = "'final', " if name == "reference" else ""
            raise LoopscopeError(
                f"{name}={text!r}: {path} does not exist; use {final}a run index of this capture, "
                "or an existing capture file[:run]"
            )
        opened = run.capture  # as the analysed capture was: --missing skip and locking reach the reference too
        other = stack.enter_context(CaptureFile(path, locking=opened.locking, missing=opened.missing))
        if index is None:
            if not other.runs:
                raise LoopscopeError(f"{name}={text!r}: {path} has no complete runs")
            return other.runs[0]
        return other.run(index)
    raise LoopscopeError(
        f"reference must be 'final', a run index, a Run or a capture file, got {type(reference).__name__}"
    )


def check_reference(run: Run, reference_run: Run, loop: str | None) -> np.ndarray:
    """The reference's row for each token of ``run``: the token at the same position, with the same id (a run that
    stored some tokens only, ``tokens=``, is matched by position, not by order), or, where positions do not say
    (none stored, or repeated as in a padded row), the same ids in the same order, the reference possibly longer.
    The states must be of the same size (a capture of the same model)."""
    rows = _rows_by_position(run, reference_run)
    if rows is None:
        rows = _rows_by_order(run, reference_run)
    size, ref_size = run.hidden_size(loop), reference_run.hidden_size(loop)
    if size != ref_size:
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} has states of size {ref_size}, run {run.index} {size}; "
            "use a reference captured from the same model"
        )
    ours, theirs = run.capture.readout, reference_run.capture.readout  # each side would be read out by its own
    if ours is not theirs and not ours.same_as(theirs, rounded=True):  # bf16 rounding of one model's norm passes
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} was captured with another readout norm than run {run.index} "
            "(other weights: another model or checkpoint); use a reference captured from the same model"
        )
    return rows


def _reference_name(run: Run, reference_run: Run) -> str:
    """'reference run N', and its file when it is another capture's: both sides may well be "run 0"."""
    own, other = run.capture.path, reference_run.capture.path
    return f"reference run {reference_run.index}" + ("" if own == other else f" of {other}")


def _rows_by_position(run: Run, reference_run: Run) -> np.ndarray | None:
    positions, ref_positions = run.positions, reference_run.positions
    if positions.ndim != 1 or ref_positions.ndim != 1 or len(np.unique(positions)) != len(positions):
        return None
    candidates = np.arange(len(ref_positions))
    if len(np.unique(ref_positions)) != len(ref_positions):  # a left-padded row: its pads repeat positions
        mask = reference_run.attention_mask  # the tokens it attended to have positions of their own
        candidates = np.flatnonzero(mask != 0) if mask.shape == ref_positions.shape else candidates[:0]
        if not candidates.size or len(np.unique(ref_positions[candidates])) != len(candidates):
            return None
    where = {int(ref_positions[i]): int(i) for i in candidates}
    rows = np.array([where.get(int(p), -1) for p in positions.tolist()], dtype=np.int64)
    found = rows >= 0
    if not np.array_equal(reference_run.token_ids[rows[found]], run.token_ids[found]):
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} covers other tokens than run {run.index} at the same positions; "
            "capture the same prompt (the reference may be longer, but must start with the same tokens)"
        )
    if not found.all():
        missing = int(positions[np.argmin(found)])
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} has {len(ref_positions)} token(s) and run {run.index} has "
            f"{len(positions)}, none at position {missing}; the reference must cover at least the run's tokens: "
            "capture it on the same prompt with at least as many new tokens"
        )
    return rows


def _rows_by_order(run: Run, reference_run: Run) -> np.ndarray:
    n = run.num_tokens
    ref_ids = reference_run.token_ids
    k = len(ref_ids)
    if not np.array_equal(ref_ids[: min(k, n)], run.token_ids[: min(k, n)]):
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} covers other tokens than run {run.index} (it has {k} token(s), "
            f"run {run.index} {n}); "
            "capture the same prompt (the reference may be longer, but must start with the same tokens)"
        )
    if k < n:
        raise LoopscopeError(
            f"{_reference_name(run, reference_run)} has {k} token(s) and run {run.index} has {n}; the reference must "
            "cover at least the run's tokens: capture it on the same prompt with at least as many new tokens"
        )
    return np.arange(n)


def reference_states(run: Run, reference_run: Run | None, space: str, loop: str | None) -> Reference:
    """Read s* of every token of ``run`` from ``reference_run`` (its last state per token), in ``space``.

    The reference must cover the same tokens (see :func:`check_reference`): a forward over prompt + generated text
    at more iterations, say.
    """
    if reference_run is None:
        return Reference(None, "final")
    rows = check_reference(run, reference_run, loop)
    n = run.num_tokens
    to_space = space_fn(reference_run, space)
    ds = reference_run.dataset(loop)
    steps = reference_run.steps_of(loop)[rows].astype(np.int64)
    # One read per block of consecutive reference rows that stopped at the same step (one for a fixed-depth run).
    blocks = []
    start = 0
    while start < n:
        stop = start + 1
        while stop < n and steps[stop] == steps[start] and rows[stop] == rows[stop - 1] + 1:
            stop += 1
        block = reference_run.read(np.s_[int(rows[start]) : int(rows[stop - 1]) + 1, int(steps[start]), :], loop)
        blocks.append(to_space(reference_run.decode(block, loop)))
        start = stop
    states = np.concatenate(blocks) if blocks else np.empty((0, ds.shape[2]))
    same_file = os.path.abspath(reference_run.capture.path) == os.path.abspath(run.capture.path)
    where = (
        f"run {reference_run.index}"
        if same_file
        else f"{os.path.basename(reference_run.capture.path)}:{reference_run.index}"
    )
    iterations = reference_run.iterations_of(loop)[rows]  # the label counts iterations, not stored steps
    label = f"{where} ({int(iterations.max()) if n else 0} steps)"
    return Reference(states, label)
