"""Distance of every iteration's state to a reference state s*, per token: ||f(s_k) - f(s*)||.

Reads the capture a block of tokens at a time (a few tens of MB), so a capture larger than memory is fine.
``space="readout"`` applies the model's stored final norm f (Huginn's ``ln_f``), the space the paper plots;
``space="state"`` uses the raw latent state.
"""

from __future__ import annotations

import numpy as np

from ..storage.errors import LoopscopeError
from ..storage.reader import Run

SPACES = ("auto", "readout", "state")
BLOCK_BYTES = 64 << 20


def convergence(
    run: Run,
    reference: str | Run = "final",
    space: str = "auto",
    *,
    loop: str | None = None,
) -> np.ndarray:
    """[T, max_steps + 1] float64: distance of s_0..s_n of each token to its s*; NaN past a token's last step.

    ``reference="final"``: s* is each token's own last state (so the last entry is 0). ``reference=<Run>``: s* is
    the last state of the same token in another run over the same tokens (e.g. a 128-iteration capture).
    """
    if space not in SPACES:
        raise LoopscopeError(f"space={space!r} is not one of {', '.join(SPACES)}")
    space = resolve_space(run, space)
    norm = _space_fn(run, space)
    steps = run.steps_of(loop)
    ds = run.dataset(loop)
    n_tokens, n_slots, hidden = ds.shape
    target = _reference_states(run, reference, space, loop)
    out = np.full((n_tokens, n_slots), np.nan)
    block = _token_block(n_slots, hidden, ds.dtype.itemsize)
    for t0 in range(0, n_tokens, block):
        t1 = min(t0 + block, n_tokens)
        states = norm(run.decode(ds[t0:t1], loop))  # [b, K, H]
        idx = np.arange(t1 - t0)
        star = target[t0:t1] if target is not None else states[idx, steps[t0:t1]]
        dist = np.linalg.norm(states - star[:, None, :], axis=-1)
        valid = np.arange(n_slots)[None, :] <= steps[t0:t1, None]
        out[t0:t1] = np.where(valid, dist, np.nan)
    return out


def resolve_space(run: Run, space: str) -> str:
    """'auto' -> 'readout' when the capture stored a readout norm, else 'state'."""
    if space == "auto":
        return "state" if run.capture.readout.kind == "none" else "readout"
    return space


def _space_fn(run: Run, space: str):
    if space == "state":
        return lambda x: np.asarray(x, dtype=np.float64)
    readout = run.capture.readout
    if readout.kind == "none":
        raise LoopscopeError(
            f"{run.capture.path} stores no readout norm for this model; use space='state' for the raw latent state"
        )
    return readout


def _reference_states(run: Run, reference, space: str, loop: str | None) -> np.ndarray | None:
    if isinstance(reference, str):
        if reference != "final":
            raise LoopscopeError(f"reference={reference!r}: use 'final' or another Run over the same tokens")
        return None
    if not isinstance(reference, Run):
        raise LoopscopeError(f"reference must be 'final' or a Run, got {type(reference).__name__}")
    if reference.num_tokens != run.num_tokens or not np.array_equal(reference.token_ids, run.token_ids):
        raise LoopscopeError(
            f"reference run {reference.index} covers other tokens than run {run.index}; capture the same prompt"
        )
    norm = _space_fn(reference, space)
    ds = reference.dataset(loop)
    steps = reference.steps_of(loop)
    rows = np.empty((run.num_tokens, ds.shape[2]))
    for t in range(run.num_tokens):
        rows[t] = norm(reference.decode(ds[t, int(steps[t])], loop))
    return rows


def _token_block(n_slots: int, hidden: int, itemsize: int) -> int:
    # float64 working copies dominate: budget for them, not the stored bytes.
    per_token = max(n_slots * hidden * max(itemsize, 8) * 3, 1)
    return max(BLOCK_BYTES // per_token, 1)
