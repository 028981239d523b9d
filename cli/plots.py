"""``loopscope plot --kind``: one function per kind of figure, found by name in :data:`PLOTS`.

A new kind is one function and one entry in the table; the option's help and its error list the table's keys, so
the kinds are named in one place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..analysis.figure_axes import prompt_rows, refuse_capture_files, with_loop
from ..analysis.metrics import CONVERGENCE_METRIC, METRIC_HELP, METRICS
from ..errors import LoopscopeError
from .measures import run_metrics
from .output import note_first_loop, run_title


@dataclass(frozen=True)
class PlotOptions:
    """What ``plot`` was told about the figure; each kind reads the few options it draws with."""

    reference: str
    space: str
    loop: str | None
    zeros: str
    tokens: str | None
    basis: str
    metric: str
    tol: float
    other: str | None
    signal: str | None


@dataclass(frozen=True)
class _Figure:
    """One figure to draw: the runs chosen, s* parsed once, and the checked figure path."""

    name: str  # the capture file's name, for titles
    runs: list
    reference: object
    out: Path
    options: PlotOptions
    stack: contextlib.ExitStack  # keeps compare's second capture file open while drawing

    @property
    def first(self):
        return self.runs[0]

    def metrics(self, run, *measures):
        """Only the named measures of ``run``: a figure rarely needs them all, and each costs arithmetic."""
        return run_metrics(run, self.reference, self.options.space, self.options.loop, measures)

    @property
    def loop(self) -> str | None:
        """The loop drawn, to name in titles and colour bars: None when the capture has only one."""
        loops = self.first.loops
        return (self.options.loop or loops[0]) if len(loops) > 1 else None

    def rows(self, run) -> dict:
        """How each figure of ``run`` labels its rows: token text with visible blanks, positions, the prompt."""
        return dict(tokens=run.tokens, positions=run.positions, prompt=prompt_rows(run))


def _heatmap(fig: _Figure) -> list:
    from ..analysis import figures

    first, m = fig.first, fig.metrics(fig.first, "distance")
    return figures.heatmap(
        m.distance,
        fig.out,
        reference=m.reference,
        space=m.space,
        readout=first.capture.readout.kind,
        loop=fig.loop,
        zeros=fig.options.zeros,
        title=f"{fig.name}, run {first.index}: convergence of the latent state",
        step_stride=first.step_stride,
        **fig.rows(first),
    )


def _compare(fig: _Figure) -> list:
    from ..analysis import figures
    from ..analysis.reference import open_reference_run, parse_reference

    if fig.options.other is None:
        raise LoopscopeError("--kind compare needs --other: a run index or FILE[:RUN]")
    first = fig.first
    second = open_reference_run(first, parse_reference(fig.options.other), fig.stack, name="other")
    if second is None:  # --other final: there is no second run to draw
        raise LoopscopeError("--kind compare needs --other: a run index or FILE[:RUN] (not 'final')")
    if second.index == first.index and _same_file(first, second):
        raise LoopscopeError(f"--other {fig.options.other} is run {first.index} itself: compare it with another run")
    a, b = (fig.metrics(r, "distance") for r in (first, second))
    rows = [fig.rows(r) for r in (first, second)]
    return figures.compare(
        a.distance,
        b.distance,
        fig.out,
        tokens=(rows[0]["tokens"], rows[1]["tokens"]),
        positions=(rows[0]["positions"], rows[1]["positions"]),
        prompts=(rows[0]["prompt"], rows[1]["prompt"]),
        reference=a.reference,
        space=a.space,
        readout=first.capture.readout.kind,
        loop=fig.loop,
        zeros=fig.options.zeros,
        titles=_panel_titles(first, second),
        step_strides=(first.step_stride, second.step_stride),
    )


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a.capture.path, b.capture.path)
    except OSError:
        return os.path.abspath(a.capture.path) == os.path.abspath(b.capture.path)


def _panel_titles(first, second) -> tuple[str, str]:
    """Each run's own file and index; two files of the same name (a/demo.h5, b/demo.h5) are told apart by path."""
    names = [Path(r.capture.path).name for r in (first, second)]
    if names[0] != names[1] or _same_file(first, second):
        return run_title(first), run_title(second)
    return tuple(os.fspath(r.capture.path) + run_title(r)[len(n) :] for r, n in zip((first, second), names))


#: The measures drawn on a linear y axis (with its fixed range, if any); the others span decades: a log axis.
_LINEAR_CURVES: dict[str, tuple[float, float] | None] = {"cosine": None, "norm": None, "update_cosine": (-1.05, 1.05)}


def _curves(fig: _Figure) -> list:
    from ..analysis import figures

    metric = fig.options.metric
    if metric not in METRICS:
        raise LoopscopeError(f"--metric {metric}: use one of {', '.join(METRICS)}")
    strides = sorted({r.step_stride for r in fig.runs})
    if len(strides) > 1:
        raise LoopscopeError(
            f"--kind curves: these runs were stored with step strides {strides}, which "
            "share no x axis; draw each stride separately"
        )
    series = [(run_title(r), fig.metrics(r, metric)[metric]) for r in fig.runs]
    title = f"{fig.name}: {METRIC_HELP[metric]} per iteration, s* = {fig.options.reference}"
    return figures.curves(
        series,
        fig.out,
        ylabel=METRIC_HELP[metric],
        log=metric not in _LINEAR_CURVES,
        ylim=_LINEAR_CURVES.get(metric),
        guide=1.0 if metric == "contraction" else None,
        title=with_loop(title, fig.loop),
        step_stride=strides[0],
    )


def _signal(fig: _Figure) -> list:
    from ..analysis import figures

    first, signal, loop = fig.first, fig.options.signal, fig.options.loop
    names = first.signal_names(loop)
    if signal is None and len(names) != 1:
        raise LoopscopeError(f"--kind signal needs --signal NAME; run {first.index} has {names or 'no signals'}")
    chosen = signal or names[0]
    return figures.signal_heatmap(
        first.signal(chosen, loop),
        fig.out,
        name=chosen,
        loop=fig.loop,
        title=f"{run_title(first)}: {chosen} per token and step",
        step_stride=first.step_stride,
        **fig.rows(first),
    )


def _exits(fig: _Figure) -> list:
    """Adaptive depth shows the steps each token took; at fixed depth, the step where each one converged."""
    from ..analysis import figures

    first, tol = fig.first, fig.options.tol
    steps = first.iterations_of(fig.options.loop)
    if np.unique(steps).size > 1:
        title = with_loop(f"{run_title(first)}: steps to exit (adaptive depth)", fig.loop)
        return figures.exits(steps, fig.out, title=title)
    m = fig.metrics(first, CONVERGENCE_METRIC)
    depth = int(steps.max()) if steps.size else 0
    return figures.exits(
        m.convergence_iterations(tol),
        fig.out,
        xlabel=f"First step with ||s - s*|| / ||s*|| <= {tol:g} from then on",
        title=with_loop(f"{run_title(first)}: fixed depth {depth}, convergence step per token", fig.loop),
        notes=(f"s* = {m.reference}",),
        never=f"never converged within tol={tol:g}",
    )


def _pca(fig: _Figure) -> list:
    from ..analysis import figures
    from ..analysis.pca import trajectory_pca

    first, options = fig.first, fig.options
    if options.tokens is not None:  # given, even as "": never quietly the default tokens instead
        selected = _parse_tokens(options.tokens, first.num_tokens)
    else:
        selected = _typical_tokens(fig.metrics(first, CONVERGENCE_METRIC), options.tol)
    trajectories = trajectory_pca(first, selected, space=options.space, loop=options.loop, basis=options.basis)
    return figures.pca_trajectories(
        trajectories, fig.out, title=f"{run_title(first)}: latent trajectories, principal components", loop=fig.loop
    )


PLOTS: dict[str, Callable[[_Figure], list]] = {
    "heatmap": _heatmap,
    "pca": _pca,
    "curves": _curves,
    "exits": _exits,
    "compare": _compare,
    "signal": _signal,
}
PLOT_KINDS = tuple(PLOTS)
KIND_HELP = f"{', '.join(PLOT_KINDS[:-1])} or {PLOT_KINDS[-1]}."
_MANY_RUNS = frozenset({"curves"})  # the kinds that draw several runs in one figure


def draw(file: Path, kind: str, runs: list[int], out: Path | None, missing: str, options: PlotOptions) -> list:
    """Check the request before any state is read (a figure can take minutes), then draw it; returns the files
    written."""
    from ..analysis import figures
    from ..analysis.reference import parse_reference
    from ..storage.reader import CaptureFile

    if kind not in PLOTS:
        raise LoopscopeError(f"--kind {kind}: use one of {', '.join(PLOT_KINDS)}")
    out = figures.check_figure_path(out if out is not None else Path(f"{kind}.png"))
    if len(runs) > 1 and kind not in _MANY_RUNS:
        raise LoopscopeError(f"--kind {kind} draws one run; repeat --run only for curves")
    reference = parse_reference(options.reference)
    with CaptureFile(file, missing=missing) as capture, contextlib.ExitStack() as stack:
        refuse_capture_files(capture, [out])  # before drawing it
        chosen = capture.select(runs, "--run")  # a run given twice would be drawn twice
        loops = chosen[0].loops if chosen else []
        if len(loops) > 1 and options.loop is None:
            note_first_loop(chosen[0], "drawing")
        return PLOTS[kind](_Figure(Path(file).name, chosen, reference, out, options, stack))


def _parse_tokens(text: str, n_tokens: int) -> list[int]:
    """``--tokens 3,7,-1`` -> [3, 7, -1]; none, or one token named twice (``3,3``, or ``2,-1`` of three), is refused:
    a trajectory drawn twice hides nothing but says nothing either."""
    try:
        chosen = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LoopscopeError(f"--tokens {text}: give token indices separated by commas, e.g. 3,7,12") from None
    if not chosen:
        raise LoopscopeError(f"--tokens {text!r}: give token indices separated by commas, e.g. 3,7,12, or leave it out")
    seen: dict[int, int] = {}
    for t in chosen:
        own = t % n_tokens if n_tokens and -n_tokens <= t < n_tokens else t  # out of range: the PCA says so
        if own in seen:
            again = f"token {t} is given twice" if seen[own] == t else f"{seen[own]} and {t} both name token {own}"
            raise LoopscopeError(f"--tokens {text}: {again}; name each token once")
        seen[own] = t
    return chosen


def _typical_tokens(m, tol: float) -> list[int]:
    """The fastest, median and slowest token to converge (one that never does is slowest of all), among those
    whose states are finite: three different behaviours to look at."""
    steps = m.convergence_steps(tol).astype(np.float64)
    if not len(steps):
        raise LoopscopeError("nothing to project: the run has no tokens; pick another run with --run")
    steps[steps < 0] = np.inf
    finite = np.setdiff1d(np.arange(len(steps)), m.nonfinite_tokens())
    order = finite[np.argsort(steps[finite], kind="stable")]
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])] if len(order) else []
    if not picks:
        raise LoopscopeError("every token has NaN or infinite states (the model blew up); there is nothing to project")
    return list(dict.fromkeys(picks))
