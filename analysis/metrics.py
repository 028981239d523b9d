"""Per-token, per-iteration measures of how the latent state approaches s*, streamed a block of tokens at a time.

One pass over the states dataset computes every measure at once, reading ``block_bytes`` worth of tokens per step
of the loop, so a capture far larger than memory (or than HDF5's chunk cache) is analysed with bounded memory.
Measures are taken in the readout space (the model's final norm, as the Huginn paper plots) or the raw state space.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from ..errors import LoopscopeError
from ..storage import schema
from ..storage.reader import Run
from .measures import METRICS, NONFINITE, UPDATE_METRICS, _wanted, stored_block_measures
from .reference import open_reference_run, reference_states, resolve_space, space_fn

METRIC_HELP = {
    "distance": "||s_k - s*||",
    "relative_distance": "||s_k - s*|| / ||s*||",
    "step_delta": "||s_k - s_(k-1)||",
    "cosine": "cos(s_k, s*)",
    "norm": "||s_k||",
    "update_cosine": "cos(s_k - s_(k-1), s_(k-1) - s_(k-2))",
    "contraction": "||s_k - s_(k-1)|| / ||s_(k-1) - s_(k-2)||",
}
DEFAULT_TOL = 1e-2
CONVERGENCE_METRIC = "relative_distance"  # what convergence_steps compares with the tolerance, by default
BLOCK_BYTES = 64 << 20
READ_AHEAD = 1  # blocks read ahead of the one being measured
_CSV_FIRST = tuple(name for name in METRICS if name not in UPDATE_METRICS)  # the CSV's measures before converged_at

_Item = TypeVar("_Item")


@dataclass
class TokenMetrics:
    """Every measure of one run, as numpy arrays, with the token metadata needed to label or export them."""

    run: int
    loop: str
    space: str
    reference: str
    num_steps: np.ndarray  # [T]
    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    tokens: list[str] | None
    distance: np.ndarray | None  # each measure None if it was not asked for (``token_metrics(measures=...)``)
    relative_distance: np.ndarray | None
    step_delta: np.ndarray | None
    cosine: np.ndarray | None
    norm: np.ndarray | None
    iterations: np.ndarray | None = None  # [T] as recorded; differs from num_steps only with a step stride
    step_stride: int = 1
    nonfinite: np.ndarray | None = None  # [T] bool: a NaN or infinite state at a step the token ran
    update_cosine: np.ndarray | None = None  # the UPDATE_METRICS last, with defaults: older callers build it as before
    contraction: np.ndarray | None = None

    @property
    def measures(self) -> tuple[str, ...]:
        """The measures computed, in :data:`METRICS` order."""
        return tuple(name for name in METRICS if getattr(self, name) is not None)

    def step_iterations(self) -> np.ndarray:
        """[T, K] the iteration each stored step holds (``Run.step_iterations``): k, or min(k * stride, last)."""
        shape = self[self.measures[0]].shape
        if self.step_stride == 1 or self.iterations is None:
            return np.broadcast_to(np.arange(shape[1])[None, :], shape)
        return schema.stored_step_iterations(self.iterations, self.step_stride, shape[1])

    def convergence_iterations(self, tol: float = DEFAULT_TOL, metric: str = CONVERGENCE_METRIC) -> np.ndarray:
        """[T] :meth:`convergence_steps` as iterations (the same numbers unless a step stride was used); -1 if never."""
        steps = self.convergence_steps(tol, metric)
        mapped = self.step_iterations()[np.arange(len(steps)), np.maximum(steps, 0)]
        return np.where(steps < 0, -1, mapped).astype(np.int64)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in METRICS:
            raise LoopscopeError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
        value = getattr(self, name)
        if value is None:
            raise LoopscopeError(f"{name} was not computed; include it in token_metrics(measures=...)")
        return value

    def convergence_steps(self, tol: float = DEFAULT_TOL, metric: str = CONVERGENCE_METRIC) -> np.ndarray:
        """[T] int: the first step from which ``metric`` stays <= ``tol`` up to the token's last step; -1 if never.

        With ``reference="final"`` every token converges by its last step (its distance there is 0); against a
        longer reference run a token may never get within ``tol``.
        """
        if isinstance(tol, bool) or not (isinstance(tol, (int, float, np.integer, np.floating)) and 0 <= tol < np.inf):
            raise LoopscopeError(f"tol={tol!r} must be a relative distance >= 0, e.g. {DEFAULT_TOL}")
        values = self[metric]
        n_slots = values.shape[1]
        beyond = np.arange(n_slots)[None, :] > self.num_steps[:, None]
        with np.errstate(invalid="ignore"):
            bad = ~((values <= tol) | beyond)
        any_bad = bad.any(axis=1)
        last_bad = n_slots - 1 - np.argmax(bad[:, ::-1], axis=1)
        steps = np.where(any_bad, last_bad + 1, 0)
        return np.where(steps > self.num_steps, -1, steps).astype(np.int64)

    def nonfinite_tokens(self) -> np.ndarray:
        """Indices of tokens with a NaN or infinite state at some step they ran (a model that blew up)."""
        if self.nonfinite is not None:
            return np.nonzero(self.nonfinite)[0]
        values = self["distance"]  # every measure was computed (the Dask analysis): a NaN state gives a NaN distance
        valid = np.arange(values.shape[1])[None, :] <= self.num_steps[:, None]
        return np.nonzero((~np.isfinite(values) & valid).any(axis=1))[0]

    def to_csv(self, path: str | os.PathLike, *, tol: float = DEFAULT_TOL, append: bool = False) -> int:
        """Write one row per (token, step) up to each token's last step; returns the number of rows.

        Columns: run, token_index, position, token_id, token, step (stored), iteration (the same unless a step
        stride was used), num_steps (stored), every measure, and ``converged_at`` (the token's
        :meth:`convergence_iterations` at ``tol``, repeated on each of its rows), then the :data:`UPDATE_METRICS`
        (after ``converged_at``: readers of the older columns find theirs in place) and ``loop`` (the loop measured:
        HRM-Text has two). Needs every measure computed.
        """
        missing = [name for name in METRICS if getattr(self, name) is None]
        if missing:
            raise LoopscopeError(
                f"to_csv writes every measure; {', '.join(missing)} not computed (use the default "
                "token_metrics(measures=METRICS))"
            )
        converged = self.convergence_iterations(tol)
        iterations = self.step_iterations()
        rows = 0
        with open(path, "a" if append else "w", newline="", encoding="utf-8", errors="replace") as handle:
            writer = csv.writer(handle)
            if not append or handle.tell() == 0:
                writer.writerow(
                    [
                        "run",
                        "token_index",
                        "position",
                        "token_id",
                        "token",
                        "step",
                        "iteration",
                        "num_steps",
                        *_CSV_FIRST,
                        "converged_at",
                        *UPDATE_METRICS,
                        "loop",
                    ]
                )
            first, later = ([self[name] for name in names] for names in (_CSV_FIRST, UPDATE_METRICS))
            for t in range(len(self.num_steps)):
                token = self.tokens[t] if self.tokens is not None else ""
                for k in range(int(self.num_steps[t]) + 1):
                    writer.writerow(
                        [
                            self.run,
                            t,
                            int(self.positions[t]),
                            int(self.token_ids[t]),
                            token,
                            k,
                            int(iterations[t, k]),
                            int(self.num_steps[t]),
                        ]
                        + [_number(c[t, k]) for c in first]
                        + [int(converged[t])]
                        + [_number(c[t, k]) for c in later]
                        + [self.loop]
                    )
                    rows += 1
        return rows


def token_metrics(
    run: Run,
    reference="final",
    space: str = "auto",
    *,
    loop: str | None = None,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[int], None] | None = None,
    measures: Iterable[str] = METRICS,
) -> TokenMetrics:
    """Compute every measure in :data:`METRICS` (or those named in ``measures``) for ``run`` in one streamed pass.

    ``reference``: ``"final"`` (each token's own last state), a run index of the same capture, a :class:`Run`,
    or another capture file as ``"path.h5"`` / ``"path.h5:N"`` (e.g. a 128-iteration run over the same tokens).
    ``space``: ``"readout"`` (the stored final norm), ``"state"`` (raw latent), or ``"auto"`` (readout if stored).
    ``progress`` is called with the number of tokens finished after each block. ``measures``: fewer measures
    cost less arithmetic (the distances alone, for a convergence figure, about 30 % less in the readout space); the
    others are None in the result.
    """
    wanted = _wanted(measures)
    space = resolve_space(run, space)
    to_space = space_fn(run, space)
    steps = run.steps_of(loop).astype(np.int64)  # a clear error first if the run has no such loop
    ds = run.dataset(loop)
    loop_name = loop if loop is not None else run.loops[0]
    n_tokens, n_slots, hidden = ds.shape
    with contextlib.ExitStack() as stack:
        ref = reference_states(run, open_reference_run(run, reference, stack), space, loop)
    out: dict[str, np.ndarray | None] = {
        name: np.full((n_tokens, n_slots), np.nan) if name in wanted else None for name in METRICS
    }
    nonfinite = np.zeros(n_tokens, dtype=bool)
    block = _token_block(n_slots, hidden, block_bytes, schema.dataset_chunks(ds))
    spans = [(t0, min(t0 + block, n_tokens)) for t0 in range(0, n_tokens, block)]
    read = _block_reader(run, loop, block)

    def load(span: tuple[int, int]) -> np.ndarray:
        return run.decode(read(*span), loop)

    for (t0, t1), stored in _read_ahead(load, spans):
        star = ref.states[t0:t1] if ref.states is not None else None
        values = stored_block_measures(stored, steps[t0:t1], star, to_space, wanted)
        nonfinite[t0:t1] = values.pop(NONFINITE)
        for name, value in values.items():
            target = out[name]
            assert target is not None  # only wanted measures are computed
            target[t0:t1] = value
        if progress is not None:
            progress(t1 - t0)
    return TokenMetrics(
        run=run.index,
        loop=loop_name,
        space=space,
        reference=ref.label,
        num_steps=steps,
        token_ids=run.token_ids,
        positions=run.positions,
        tokens=run.tokens,
        **out,
        iterations=run.iterations_of(loop_name),
        step_stride=run.step_stride,
        nonfinite=nonfinite,
    )


def convergence(run: Run, reference="final", space: str = "auto", *, loop: str | None = None) -> np.ndarray:
    """[T, max_steps + 1] float64: ||f(s_k) - f(s*)|| of each token; NaN past a token's last step.

    The figure the Huginn paper draws; see :func:`token_metrics` for ``reference`` and ``space`` and for the
    other measures. A run of several loops (HRM-Text's H and L) without ``loop=`` is measured in its first, and a
    warning says so: the bare array could not.
    """
    if loop is None and len(run.loops) > 1:
        warnings.warn(
            f"loopscope: run {run.index} has loops {', '.join(run.loops)}; convergence() measured {run.loops[0]} "
            "(pass loop= for another)",
            stacklevel=2,
        )
    distance = token_metrics(run, reference, space, loop=loop, measures=("distance",)).distance
    assert distance is not None  # asked for
    return distance


def step_profile(values: np.ndarray, low: float = 10, high: float = 90) -> dict[str, np.ndarray]:
    """Across tokens, per step: mean, median and the ``low``-``high`` percentile band, ignoring NaN."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.sum(np.isfinite(values), axis=0)
    keep = counts > 0
    data = values[:, keep]
    with np.errstate(invalid="ignore"):
        return {
            "step": np.nonzero(keep)[0],
            "count": counts[keep],
            "mean": np.nanmean(data, axis=0),
            "median": np.nanmedian(data, axis=0),
            "low": np.nanpercentile(data, low, axis=0),
            "high": np.nanpercentile(data, high, axis=0),
        }


def _block_reader(run: Run, loop: str | None, block: int) -> Callable[[int, int], np.ndarray]:
    """``read(t0, t1)``: tokens t0:t1 in the stored representation, into READ_AHEAD + 1 buffers in turn (the blocks
    read ahead and the one being measured), so each result stays valid for READ_AHEAD more calls."""
    ds = run.dataset(loop)
    buffers = [np.empty((min(block, ds.shape[0]), *ds.shape[1:]), ds.dtype) for _ in range(READ_AHEAD + 1)]
    calls = itertools.count()

    def read(t0: int, t1: int) -> np.ndarray:
        return run.read(np.s_[t0:t1], loop, out=buffers[next(calls) % len(buffers)][: t1 - t0])

    return read


def _read_ahead(load: Callable[[_Item], np.ndarray], items: Iterable[_Item]) -> Iterator[tuple[_Item, np.ndarray]]:
    """``(item, load(item))`` for each item in order, up to READ_AHEAD items loading on a second thread while the
    caller works on the current one: h5py and numpy release the GIL, so reading overlaps the arithmetic. A loaded
    item is not used once the next is asked for."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > READ_AHEAD:
                item, loaded = pending.popleft()
                yield item, loaded.result()
        while pending:
            item, loaded = pending.popleft()
            yield item, loaded.result()


def _token_block(n_slots: int, hidden: int, budget: int, chunks: tuple[int, ...] | None) -> int:
    """Tokens per read: what a block holds of a token's trajectory fits in ``budget`` (READ_AHEAD + 1 read buffers
    and a decoded float32 copy; the float64 work is done a slice of SLICE_BYTES at a time), in whole chunks.

    A block smaller than one chunk row straddles chunks and reads each twice (the capture writes ~1 MiB chunks
    with no chunk cache), so it is rounded up to a whole chunk row when that costs at most twice the budget."""
    per_token = max(n_slots * hidden * 4 * (READ_AHEAD + 2), 1)
    tokens = max(budget // per_token, 1)
    chunk_tokens = chunks[0] if chunks else 1
    if tokens < chunk_tokens and chunk_tokens * per_token <= 2 * budget:
        return chunk_tokens
    return max((tokens // chunk_tokens) * chunk_tokens, min(tokens, chunk_tokens), 1)


def _number(value: float) -> str:
    return "" if not np.isfinite(value) else repr(float(value))
