"""Principal components of latent trajectories: does a token's state settle, orbit, or slide?

Following the Huginn paper's trajectory plots, each token's states s_0..s_n are centred on their own centre of mass
and projected on principal directions; pairs of components (1-2, 3-4, 5-6) then show a point (fixed point), a loop
(orbit) or a drift (slider). Only the selected tokens' trajectories are read, one token at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from ..errors import LoopscopeError
from ..storage.reader import Run
from .reference import resolve_space, space_fn

BASES = ("token", "shared")


@dataclass
class TrajectoryPCA:
    """One token's trajectory in principal-component coordinates."""

    token: int
    label: str  # the token's text (or id) for legends
    projections: np.ndarray  # [n + 1, C]: s_0..s_n, centred on the trajectory's centre of mass
    explained: np.ndarray  # [C] fraction of the variance each component explains
    centre: np.ndarray  # [H] the centre of mass, in the analysis space
    iterations: np.ndarray | None = None  # [n + 1] the iteration each row holds (a step stride skips some); None: 0..n

    @property
    def held(self) -> np.ndarray:
        """[n + 1] the iteration of each row: ``iterations``, or 0..n when every iteration was stored."""
        rows = np.arange(self.projections.shape[0])
        return rows if self.iterations is None else np.asarray(self.iterations, dtype=np.int64)


def trajectory_pca(
    run: Run,
    tokens: list[int],
    *,
    n_components: int = 6,
    space: str = "auto",
    loop: str | None = None,
    basis: str = "token",
) -> list[TrajectoryPCA]:
    """Project the trajectories of ``tokens`` on their principal components.

    ``basis="token"``: each token gets its own components (the paper's per-token view). ``basis="shared"``: one set
    of components fitted on all selected, individually centred trajectories, so tokens can be compared in one frame.
    Component signs are fixed (largest loading positive) so figures are reproducible.
    """
    if basis not in BASES:
        raise LoopscopeError(f"basis={basis!r} is not one of {', '.join(BASES)}")
    if not tokens:
        raise LoopscopeError("select at least one token for the PCA")
    n = run.num_tokens
    for t in tokens:
        if not -n <= t < n:
            raise LoopscopeError(f"token {t} is out of range: run {run.index} has {n} tokens (use 0..{n - 1})")
    if len({t % n for t in tokens}) < len(tokens):  # one trajectory drawn twice says nothing
        raise LoopscopeError(f"tokens={list(tokens)} names a token twice; name each token once")
    to_space = space_fn(run, resolve_space(run, space))
    held = run.step_iterations(loop)  # [T, K]: with a step stride, row k is not iteration k
    centred, centres = [], []
    for t in tokens:
        x = np.asarray(to_space(run.states(token=t, loop=loop)), dtype=np.float64)
        if not np.isfinite(x).all():
            raise LoopscopeError(
                f"token {t} of run {run.index} has NaN or infinite states (the model blew up there); "
                "pick tokens whose states are finite"
            )
        centre = x.mean(axis=0)
        centred.append(x - centre)
        centres.append(centre)
    if basis == "shared":
        shared_axes, shared_var = _principal_axes(np.concatenate(centred), n_components)
    results = []
    for t, x, centre in zip(tokens, centred, centres):
        axes, variance = (shared_axes, shared_var) if basis == "shared" else _principal_axes(x, n_components)
        total = float(np.sum(x * x)) if basis == "token" else float(sum(np.sum(c * c) for c in centred))
        explained = variance / total if total > 0 else np.zeros_like(variance)
        iterations = held[t % n, : len(x)]
        results.append(TrajectoryPCA(t % n, _label(run, t), x @ axes.T, explained, centre, iterations))
    return results


def block_trajectories(x: np.ndarray, last: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Every token of a block in its own principal components at once (the ``basis="token"`` view, batched).

    ``x`` [B, K, H]: states in the analysis space; ``last`` [B]: each token's last stored step. Returns projections
    [B, K, C] (NaN past a token's last step, and for a token whose states are not all finite) and explained
    variance fractions [B, C]. Rows past the last step are zeroed after centring, which leaves the components of the
    real rows unchanged, so one batched call serves tokens of any depth. The components come from the K x K Gram
    matrix of each token's steps (K << H): a batched ``eigh`` of it is an order of magnitude faster than an SVD of
    the states, and the few leading components a figure shows are well separated.
    """
    x = np.asarray(x, dtype=np.float64)
    n_tokens, n_slots, _ = x.shape
    valid = np.arange(n_slots)[None, :] <= np.asarray(last)[:, None]  # [B, K]
    finite = np.asarray(np.where(valid[:, :, None], np.isfinite(x), True).all(axis=(1, 2)))
    centred = np.where(valid[:, :, None] & finite[:, None, None], x, 0.0)
    centred -= (centred.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)[:, None])[:, None, :]
    centred[~valid] = 0.0
    count = min(n_components, n_slots)
    # thousands of tiny problems: on a busy machine, BLAS threads cost 4-25x the arithmetic they share
    with threadpool_limits(limits=1, user_api="blas"):
        values, vectors = np.linalg.eigh(centred @ centred.transpose(0, 2, 1))  # ascending
    variance = np.maximum(values[:, ::-1][:, :count], 0.0)  # [B, C] sums of squares along each component
    sigma = np.sqrt(variance)
    axes = np.einsum("bkh,bkc->bch", centred, vectors[:, :, ::-1][:, :, :count])
    axes = np.divide(axes, sigma[:, :, None], out=np.zeros_like(axes), where=sigma[:, :, None] > 0)
    loadings = np.take_along_axis(axes, np.argmax(np.abs(axes), axis=2)[:, :, None], axis=2)[:, :, 0]
    axes *= np.where(loadings < 0, -1.0, 1.0)[:, :, None]  # signs fixed as in _oriented_axes: largest loading > 0
    projections = np.einsum("bkh,bch->bkc", centred, axes)
    projections[~valid] = np.nan
    projections[~finite] = np.nan
    total = np.einsum("bkh,bkh->b", centred, centred)
    explained = np.divide(variance, total[:, None], out=np.zeros_like(variance), where=total[:, None] > 0)
    return projections, explained


def _principal_axes(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Top principal directions [C, H] of centred rows ``x`` and the variance (sum of squares) along each."""
    if not np.isfinite(x).all():  # an SVD of them would fail with LinAlgError
        raise LoopscopeError("a trajectory holds NaN or infinite states (the model blew up); pick other tokens")
    _, singular, vt = np.linalg.svd(x, full_matrices=False)
    return _oriented_axes(vt, singular, n_components)


def _oriented_axes(vt: np.ndarray, singular: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n_components`` right singular vectors, signs fixed (largest loading positive), and variances."""
    count = min(n_components, vt.shape[0])
    axes = vt[:count]
    signs = np.sign(axes[np.arange(count), np.argmax(np.abs(axes), axis=1)])
    signs[signs == 0] = 1
    return axes * signs[:, None], singular[:count] ** 2


def _label(run: Run, t: int) -> str:
    tokens = run.tokens
    return repr(tokens[t]) if tokens is not None else f"id {int(run.token_ids[t])}"
