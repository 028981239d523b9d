"""The arithmetic of every measure on one block of tokens: the one place it lives, shared by the streamed analysis
(``metrics.py``) and the Dask one (``distributed.py``). Float32 where that is exact enough, float64 where not."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ..errors import LoopscopeError

#: The measures of the updates u_k = s_k - s_(k-1) against the one before: how the loop contracts, with no s*.
UPDATE_METRICS = ("update_cosine", "contraction")
#: Every measure, each [T, K] with K = max steps + 1 (s_0..s_n); NaN past a token's last step.
METRICS = ("distance", "relative_distance", "step_delta", "cosine", "norm", *UPDATE_METRICS)
NONFINITE = "nonfinite"  # block_measures' key for its [b] flags of tokens with a NaN or infinite state
SLICE_BYTES = 1 << 20  # states measured at a time, so that they and their scratch copies stay in the CPU cache


def block_measures(
    states: np.ndarray, last: np.ndarray, star: np.ndarray | None = None, measures: Iterable[str] = METRICS
) -> dict[str, np.ndarray]:
    """Every measure (or those in ``measures``) of a block of tokens: ``states`` [b, K, H] in the analysis space,
    ``last`` [b] each token's last step, ``star`` [b, H] s* (None: each token's own last state). Each result is
    [b, K] float64, NaN past ``last``; and under :data:`NONFINITE`, [b] bool, whether a token has a NaN or infinite
    state at a step it ran (found in the sums of squares taken, so it holds whichever measures were asked for). The
    one place the arithmetic lives, shared by the streamed and the Dask analysis.

    Float32 states (the stored values in the state space) are measured in float32, at half the memory traffic of
    float64: differences of float32 numbers are exact where they are close (near convergence, where distances are
    tiny), sums of squares (BLAS) carry ~1e-7 relative error, and dot products accumulate in float64. A block whose
    squares overflow float32 (norms past ~1e19) is measured again in float64.
    """
    states = np.asarray(states, dtype=np.result_type(states, np.float32))
    if star is None:
        star = states[np.arange(len(last)), last]
    valid = np.arange(states.shape[1])[None, :] <= last[:, None]
    wanted = _wanted(measures)
    with np.errstate(all="ignore"):  # NaN/Inf states (a model that blew up) give NaN measures, flagged later
        values, norms = _measures(states, star, wanted)
        if states.dtype == np.float32 and _overflowed(norms, valid):
            values, norms = _measures(states.astype(np.float64), star.astype(np.float64), wanted)
        nonfinite = np.zeros(len(last), dtype=bool)
        for norm, columns in norms:
            nonfinite |= (~np.isfinite(norm) & valid[:, columns]).any(axis=1)
    return {**{name: np.where(valid, value, np.nan) for name, value in values.items()}, NONFINITE: nonfinite}


def stored_block_measures(
    stored: np.ndarray,
    last: np.ndarray,
    star: np.ndarray | None,
    to_space: Callable[[np.ndarray], np.ndarray],
    measures: Iterable[str] = METRICS,
) -> dict[str, np.ndarray]:
    """:func:`block_measures` of decoded stored states, mapped by ``to_space`` and measured SLICE_BYTES at a time:
    a slice's analysis-space copy and scratch arrays stay in the CPU cache between the passes over them (whole
    8 MB blocks measured ~1.3x slower here)."""
    rows = max(1, SLICE_BYTES * len(stored) // max(stored.nbytes, 1))
    parts = [
        block_measures(
            to_space(stored[t : t + rows]), last[t : t + rows], None if star is None else star[t : t + rows], measures
        )
        for t in range(0, len(stored) or 1, rows)
    ]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _measures(
    states: np.ndarray, star: np.ndarray, wanted: frozenset[str]
) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, slice]]]:
    """The ``wanted`` measures of every step, in the precision of ``states`` and ``star``, through one scratch
    array; also the norms taken on the way, each with the steps it covers (a sum of squares may overflow float32,
    and a NaN or infinite one marks a state that is)."""
    work = np.empty(states.shape, np.result_type(states, star))
    star_norm = _norm(star)[:, None]
    values: dict[str, np.ndarray] = {}
    every = slice(None)
    norms = [(np.broadcast_to(star_norm, states.shape[:2]), every)]  # (sums of squares, the steps they cover)
    if wanted & {"norm", "cosine"}:
        state_norms = _norm(states)
        norms.append((state_norms, every))
        if "norm" in wanted:
            values["norm"] = state_norms
        if "cosine" in wanted:
            values["cosine"] = _dot(states, star) / (state_norms * star_norm)
    if wanted & {"distance", "relative_distance"}:
        dist = _norm(np.subtract(states, star[:, None, :], out=work))
        norms.append((dist, every))
        if "distance" in wanted:
            values["distance"] = dist
        if "relative_distance" in wanted:  # 0 where s_k is s* (a pad's all-zero states: 0 / 0), at any scale
            with np.errstate(divide="ignore", invalid="ignore"):
                values["relative_distance"] = np.where(dist == 0, 0.0, dist / star_norm)
    if wanted & {"step_delta", *UPDATE_METRICS}:
        updates = np.subtract(states[:, 1:], states[:, :-1], out=work[:, 1:])  # u_k, k >= 1
        delta = np.full(states.shape[:2], np.nan)
        delta[:, 1:] = _norm(updates)
        norms.append((delta[:, 1:], slice(1, None)))  # step 0 has no delta, by definition
        if "step_delta" in wanted:
            values["step_delta"] = delta
        now, before = delta[:, 2:], delta[:, 1:-1]  # ||u_k||, ||u_(k-1)|| for k >= 2
        if "contraction" in wanted:
            values["contraction"] = _from_step_2(now / before, before)
        if "update_cosine" in wanted:
            cosine = _row_dot(*_exact_pairs(states, updates)) / (now * before)
            values["update_cosine"] = _from_step_2(cosine, np.minimum(now, before))
    return {name: values[name] for name in METRICS if name in values}, norms


def _overflowed(norms: list[tuple[np.ndarray, slice]], valid: np.ndarray) -> bool:
    """Whether a sum of squares reached infinity at a step a token ran (in float32 it may be finite in float64)."""
    return any(np.isinf(norm[valid[:, columns]]).any() for norm, columns in norms)


def _wanted(measures: Iterable[str]) -> frozenset[str]:
    """The measures asked for, checked: a clear error for a misspelt name or none at all."""
    wanted = frozenset([measures] if isinstance(measures, str) else measures)
    unknown = sorted(wanted - set(METRICS))
    if unknown or not wanted:
        raise LoopscopeError(f"measures={sorted(wanted)!r}: name one or more of {', '.join(METRICS)}")
    return wanted


def _norm(x: np.ndarray) -> np.ndarray:
    """Euclidean norm over the last axis, as float64, without the squared temporary ``np.linalg.norm`` makes."""
    return np.sqrt(_row_dot(x, x).astype(np.float64))


def _row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dot product of matching rows (last axis), through BLAS (sdot/ddot: ~3x ``einsum``, and more precise)."""
    return np.matmul(a[..., None, :], b[..., :, None])[..., 0, 0]


def _dot(states: np.ndarray, star: np.ndarray) -> np.ndarray:
    """[b, K] s_k . s* summed in float64, where products of float32 numbers are exact: a cosine near 0 (early
    steps, far from s*) keeps its relative precision, which a float32 sum of cancelling terms would lose."""
    return _row_dot(states.astype(np.float64, copy=False), star.astype(np.float64)[:, None, :])


def _exact_pairs(states: np.ndarray, updates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(u_k, u_(k-1)) for k >= 2 in float64, to be multiplied there: float32 differences are rounded far from s*
    (where successive states are not within a factor of 2), and a cosine near 0 would lose its relative precision.
    Float64 states reuse ``updates`` (the scratch array); float32 ones make one float64 array of them, as ``_dot``."""
    if updates.dtype != np.float64:
        updates = np.subtract(states[:, 1:], states[:, :-1], dtype=np.float64)
    return updates[:, 1:], updates[:, :-1]


def _from_step_2(ratio: np.ndarray, divisor: np.ndarray) -> np.ndarray:
    """[b, K]: ``ratio`` (of steps k >= 2) where its ``divisor`` > 0; NaN at k < 2 (fewer than two updates), where
    the divisor is 0 (a zero update: no direction, nothing to compare with) or NaN (a NaN state)."""
    out = np.full((len(ratio), ratio.shape[1] + 2), np.nan)
    out[:, 2:] = np.where(divisor > 0, ratio, np.nan)
    return out
