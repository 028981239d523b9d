"""What the interactive report shows of each run and loop, computed once in Python and packed for the page.

Per token and stored step: ||s_k - s*|| with s* each token's own final state (what ``loopscope plot`` draws by
default), the step size ||s_k - s_(k-1)||, and the trajectory in its first two principal components (each token in
its own basis, as the Huginn paper's trajectory plots); with a model, the lens's top-k predictions per step. The page
has no server to ask, so everything it can show is computed here. Arrays travel as base64 of little-endian float32
or int32: a 10,000-token run of 65 steps is 2.6 MB per measure, about a third of the same numbers written as JSON.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..analysis.figure_axes import nonfinite_note, printable, prompt_rows, space_text, steps_label
from ..analysis.metrics import token_metrics
from ..analysis.pca import block_trajectories
from ..analysis.reference import space_fn
from ..storage import schema
from ..storage.reader import Run
from .page import readable

BLOCK_BYTES = 64 << 20  # states read at once for the trajectories
LABEL_CHARACTERS = 24  # a token's label on the heatmap's axis; the token panel shows it whole


@dataclass
class LensView:
    """The lens of one run and loop as the page needs it: top-k ids, their probabilities, KL to the last step."""

    kind: str
    top_ids: np.ndarray  # [T, K, top_k] int
    top_probs: np.ndarray  # [T, K, top_k]
    kl_final: np.ndarray  # [T, K] nats
    vocab: dict[int, str]  # the text of every id that appears in top_ids


@dataclass
class RunView:
    """One entry of the page's run selector: a run, and one of its loops when it has several."""

    run: int
    loop: str
    loops: int  # how many loops the run has: the label names the loop only when there are several
    call: str  # "forward", "generate" or a family's method called by name
    tokens: list[str]  # each row's whole token text ("" when the capture stored none)
    token_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    prompt: int | None  # prompt rows of a generate() run
    last: np.ndarray  # [T] each token's last stored step
    iterations: np.ndarray  # [T, K] the iteration each stored step holds
    distance: np.ndarray  # [T, K]
    step_delta: np.ndarray  # [T, K]
    pca: np.ndarray  # [T, K, 2]
    explained: np.ndarray  # [T, 2]
    space: str  # as figure labels say it ("readout space", "state space (...)")
    step_stride: int = 1  # the run's own: runs of one capture may differ (its step axis is labelled with it)
    lens: LensView | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        loop = f" · loop {self.loop}" if self.loops > 1 else ""
        return f"run {self.run}{loop} · {self.call} · {len(self.tokens)} tokens · {int(self.iterations.max())} steps"


def run_views(run: Run, progress: Callable[[str], None] | None = None, space: str = "auto") -> list[RunView]:
    """A view of every loop of ``run`` (HRM-Text has two); ``progress`` hears what is being computed. ``space``:
    where distances and trajectories are taken, as for ``token_metrics`` (readout, state, or auto)."""
    views = []
    for loop in run.loops:
        if progress is not None:
            progress(f"run {run.index}" + (f", loop {loop}" if len(run.loops) > 1 else ""))
        metrics = token_metrics(run, "final", space, loop=loop, measures=("distance", "step_delta"))
        assert metrics.distance is not None and metrics.step_delta is not None  # asked for
        last = run.steps_of(loop).astype(np.int64)
        projections, explained = _trajectories(run, loop, last, metrics.space)
        tokens = run.tokens
        blown = nonfinite_note(metrics)  # their cells are blank: say why, as ``plot`` does
        views.append(
            RunView(
                run=run.index,
                loop=loop,
                loops=len(run.loops),
                call=schema.as_text(run.attrs.get("call")) or "forward",
                tokens=list(tokens) if tokens is not None else [""] * run.num_tokens,
                token_ids=run.token_ids,
                positions=run.positions,
                prompt=prompt_rows(run),
                last=last,
                iterations=np.asarray(run.step_iterations(loop)),
                distance=metrics.distance,
                step_delta=metrics.step_delta,
                pca=projections,
                explained=explained,
                space=space_text(metrics.space, run.capture.readout.kind),
                step_stride=run.step_stride,
                notes=[] if blown is None else [blown],
            )
        )
    return views


def _trajectories(run: Run, loop: str, last: np.ndarray, space: str) -> tuple[np.ndarray, np.ndarray]:
    """[T, K, 2] every token's trajectory in its own first two principal components, read a block at a time."""
    to_space = space_fn(run, space)
    n_tokens, n_slots, hidden = run.dataset(loop).shape
    block = max(1, BLOCK_BYTES // max(1, n_slots * hidden * 8))
    projections = np.full((n_tokens, n_slots, 2), np.nan)
    explained = np.zeros((n_tokens, 2))
    for t0 in range(0, n_tokens, block):
        t1 = min(t0 + block, n_tokens)
        states = to_space(run.decode(run.read(np.s_[t0:t1], loop), loop))
        p, e = block_trajectories(states, last[t0:t1], 2)
        projections[t0:t1, :, : p.shape[2]] = p
        explained[t0:t1, : e.shape[1]] = e
    return projections, explained


def lens_view(result, tokenizer) -> LensView:
    """The page's part of a :class:`~loopscope.analysis.lens_result.LensResult`: every top-k id decoded once."""
    ids = np.asarray(result.top_ids)
    vocab = {}
    for token_id in np.unique(ids[ids >= 0]):
        text = tokenizer.decode([int(token_id)]) if tokenizer is not None else f"id {int(token_id)}"
        vocab[int(token_id)] = readable(str(text))  # as the capture stores a token's text (lone surrogates too)
    return LensView(result.kind, ids, np.asarray(result.top_probs), np.asarray(result.kl_final), vocab)


def packed(view: RunView) -> dict:
    """``view`` as JSON: small fields as they are, arrays as base64 (decoded by the page's ``unpack``)."""
    data = {
        "key": f"{view.run}:{view.loop}",
        "label": view.label,
        "run": view.run,
        "loop": view.loop if view.loops > 1 else None,
        "call": view.call,
        "tokens": view.tokens,
        "labels": [printable(text, LABEL_CHARACTERS, matplotlib=False) if text else "" for text in view.tokens],
        "prompt": view.prompt,
        "space": view.space,
        "space_name": view.space.split()[0],  # "readout" or "state": the short form for axis titles
        "step_stride": view.step_stride,
        "steps_label": steps_label(view.step_stride),  # the x axis of this run's heatmaps
        "notes": view.notes,
        "shape": list(view.distance.shape),
        "token_ids": _array(view.token_ids, "<i4"),
        "positions": _array(view.positions, "<i4"),
        "last": _array(view.last, "<i4"),
        "iterations": _array(view.iterations, "<i4"),
        "distance": _array(view.distance, "<f4"),
        "step_delta": _array(view.step_delta, "<f4"),
        "pca": _array(view.pca, "<f4"),
        "explained": _array(view.explained, "<f4"),
        "lens": None,
    }
    if view.lens is not None:
        lens = view.lens
        data["lens"] = {
            "kind": lens.kind,
            "top_k": int(lens.top_ids.shape[2]),
            "top_ids": _array(lens.top_ids, "<i4"),
            "top_probs": _array(lens.top_probs, "<f4"),
            "kl_final": _array(lens.kl_final, "<f4"),
            "vocab": {str(k): v for k, v in lens.vocab.items()},
        }
    return data


def _array(values: np.ndarray, dtype: str) -> dict:
    """An array as {dtype, shape, base64 of its bytes}: NaN survives (JSON has none), and it is compact."""
    a = np.ascontiguousarray(np.asarray(values), dtype=dtype)
    return {"dtype": dtype[1:], "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}
