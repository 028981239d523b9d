"""Figures in the style of the Huginn paper, drawn with matplotlib (Agg backend: no display needed).

Every function takes arrays (from :mod:`.metrics` or :mod:`.pca`), writes the figure in the format its file
extension names (.png, .pdf, .svg) and returns the paths written. Iterations run along x, labelled
"Iterations at Test-Time" as in the paper; distances are drawn on a log scale.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from ..errors import LoopscopeError
from .figure_axes import (  # noqa: F401 (FORMATS, ITERATIONS, check_figure_path: used from here by callers)
    FORMATS,
    ITERATIONS,
    MAX_TOKEN_LABELS,
    PROMPT_NOTE,
    _cells,
    _heatmap_page,
    _height,
    _log_scale,
    _pyplot,
    _save_pages,
    _t,
    check_figure_path,
    colour_bar,
    integer_ticks,
    marks_prompt,
    percent,
    printable,
    prompt_line,
    space_text,
    steps_label,
    token_axes,
    with_loop,
)

ZERO_MODES = ("clip", "drop")
ROWS_PER_PAGE = 128


def heatmap(
    distances: np.ndarray,
    out: str | os.PathLike,
    *,
    tokens: list[str] | None = None,
    positions: np.ndarray | None = None,
    title: str | None = None,
    reference: str = "final",
    space: str = "readout",
    zeros: str = "clip",
    rows_per_page: int = ROWS_PER_PAGE,
    step_stride: int = 1,
    readout: str | None = None,
    loop: str | None = None,
    prompt: int | None = None,
    label: Callable[[str], str] = printable,
) -> list[str]:
    """Convergence heatmap: tokens down the y axis, iterations along x, log-scaled ||s_k - s*|| (viridis).

    Token strings label the left axis (each token's index in the run when there are none) and positions the right
    one. A distance of exactly zero (a token's last step when s* is its own final state) has no place on a log
    scale: ``zeros="clip"`` shows it at the smallest positive distance, ``zeros="drop"`` leaves it blank and drops
    trailing columns that hold nothing else; the colour bar says which. Longer sequences are split into pages of
    ``rows_per_page`` tokens sharing one colour scale: pages of one PDF, or ``name-p01.png``, ... for PNG and SVG.
    ``readout``: the capture's readout kind (an identity readout means the state space); ``loop``: named in the
    title and colour bar (pass it for a capture with several loops); ``prompt``: the number of prompt rows of a
    generate() run, marked by a line; ``label``: how a token's text becomes a tick label.
    """
    plt, LogNorm = _pyplot()
    if zeros not in ZERO_MODES:
        raise LoopscopeError(f"zeros={zeros!r} is not one of {', '.join(ZERO_MODES)}")
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise LoopscopeError("nothing to draw: the run has no tokens or no iterations")
    norm, shown, note = _log_scale(d, zeros, LogNorm)
    colour_label = with_loop(f"||s - s*|| ({space_text(space, readout)}, s* = {reference}){note}", loop)
    title = with_loop(title or "Convergence of the latent state", loop)
    pages = _Pages(tokens, positions, rows_per_page, step_stride, prompt, label)
    return pages.save(plt, shown, norm, out, colour_label, title)


def signal_heatmap(
    values: np.ndarray,
    out: str | os.PathLike,
    *,
    name: str,
    tokens: list[str] | None = None,
    positions: np.ndarray | None = None,
    title: str | None = None,
    rows_per_page: int = ROWS_PER_PAGE,
    step_stride: int = 1,
    loop: str | None = None,
    prompt: int | None = None,
    label: Callable[[str], str] = printable,
) -> list[str]:
    """A per-token, per-step signal (Ouro's exit gate, Huginn's exit criterion) on a linear colour scale, laid out
    like the convergence heatmap; steps where nothing was recorded stay blank."""
    plt, _ = _pyplot()
    from matplotlib.colors import Normalize

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0 or not np.isfinite(v).any():
        raise LoopscopeError(f"nothing to draw: signal {name!r} has no recorded values")
    norm = Normalize(vmin=np.nanmin(v[np.isfinite(v)]), vmax=np.nanmax(v[np.isfinite(v)]))
    shown = np.where(np.isfinite(v), v, np.nan)
    pages = _Pages(tokens, positions, rows_per_page, step_stride, prompt, label)
    return pages.save(plt, shown, norm, out, with_loop(name, loop), with_loop(title or f"Signal {name}", loop))


class _Pages:
    """Token rows in pages of ``rows_per_page`` sharing one colour scale, labelled alike on every page."""

    def __init__(self, tokens, positions, rows_per_page, step_stride, prompt, label):
        self.tokens, self.positions, self.rows_per_page = tokens, positions, max(rows_per_page, 1)
        self.step_stride, self.prompt, self.label = step_stride, prompt, label

    def save(self, plt, shown, norm, out, colour_label, title) -> list[str]:
        n_tokens = shown.shape[0]
        positions = np.arange(n_tokens) if self.positions is None else np.asarray(self.positions)
        pages = [(start, min(start + self.rows_per_page, n_tokens)) for start in range(0, n_tokens, self.rows_per_page)]
        figures = []
        for number, (start, stop) in enumerate(pages, 1):
            fig = _heatmap_page(
                plt, shown[start:stop], norm, start, self.tokens, positions, colour_label, self.step_stride,
                prompt=self.prompt, label=self.label,
            )  # fmt: skip
            page_title = title
            if len(pages) > 1:
                page_title += f" (tokens {start}-{stop - 1}, page {number}/{len(pages)})"
            marked = marks_prompt(self.prompt, start, stop)
            # the note is ours, added after the file's text is cleaned (which would escape its line break)
            fig.axes[0].set_title(_t(page_title) + (f"\n({PROMPT_NOTE})" if marked else ""))
            figures.append(fig)
        return _save_pages(plt, figures, out)


def compare(
    first: np.ndarray,
    second: np.ndarray,
    out: str | os.PathLike,
    *,
    titles: tuple[str, str] = ("A", "B"),
    tokens: list[str] | tuple[list[str] | None, list[str] | None] | None = None,
    positions: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    reference: str = "final",
    space: str = "readout",
    zeros: str = "clip",
    step_strides: tuple[int, int] = (1, 1),
    readout: str | None = None,
    loop: str | None = None,
    prompts: tuple[int | None, int | None] = (None, None),
    label: Callable[[str], str] = printable,
) -> list[str]:
    """Two convergence heatmaps side by side on one colour scale (e.g. 32 vs 64 iterations, or two prompts).

    Rows line up by token index (the shorter run padded with blank rows); each panel has its own token labels
    (``tokens``: one list for both, or one per run), positions on the right and prompt line (``prompts``)."""
    plt, LogNorm = _pyplot()
    if zeros not in ZERO_MODES:
        raise LoopscopeError(f"zeros={zeros!r} is not one of {', '.join(ZERO_MODES)}")
    a, b = (np.asarray(x, dtype=np.float64) for x in (first, second))
    if a.ndim != 2 or b.ndim != 2 or not a.size or not b.size:
        raise LoopscopeError("nothing to draw: a run has no tokens or no iterations")
    norm, _, note = _log_scale(np.concatenate([a.ravel(), b.ravel()])[None, :], zeros, LogNorm)
    rows = max(a.shape[0], b.shape[0])
    texts = tokens if isinstance(tokens, tuple) else (tokens, tokens)
    fig, axes = plt.subplots(
        1, 2, figsize=(15, max(_height(min(rows, ROWS_PER_PAGE)), 3.0)), constrained_layout=True, squeeze=True
    )
    image, panels = None, []
    for n, (ax, d, name, stride) in enumerate(zip(axes, (a, b), titles, step_strides)):
        _, shown, _ = _log_scale(d, zeros, LogNorm, floor=norm.vmin)  # s* at the floor the colour bar names
        padded = np.ma.masked_all((rows, shown.shape[1]))
        padded[: d.shape[0]] = shown
        image = _cells(ax, padded, norm)
        ax.set_xlabel(steps_label(stride))
        integer_ticks(ax.xaxis)
        where = np.arange(d.shape[0]) if positions[n] is None else np.asarray(positions[n])[: d.shape[0]]
        text = texts[n]
        run_tokens = text if text is not None and len(text) >= d.shape[0] else None
        panels += [ax, token_axes(ax, rows, 0, run_tokens, where, label)]
        marked = prompt_line(ax, prompts[n], 0, d.shape[0])
        ax.set_title(_t(with_loop(name, loop)) + (f"\n({PROMPT_NOTE})" if marked else ""))
    colour = f"||s - s*|| ({space_text(space, readout)}, s* = {reference}){note}"
    colour_bar(fig, image, panels, with_loop(colour, loop))
    return _save_pages(plt, [fig], out)


def curves(
    series: list[tuple[str, np.ndarray]],
    out: str | os.PathLike,
    *,
    ylabel: str = "||s - s*||",
    log: bool = True,
    title: str | None = None,
    band: tuple[float, float] = (10, 90),
    step_stride: int = 1,
    ylim: tuple[float, float] | None = None,
    guide: float | None = None,
) -> list[str]:
    """Mean over tokens per iteration, with the ``band`` percentile spread shaded; one line per (label, [T, K]).
    ``ylim`` fixes the y range (a cosine's -1..1 keeps figures comparable); ``guide`` draws a dashed level (a
    contraction ratio of 1, between contracting and expanding)."""
    from .metrics import step_profile

    plt, _ = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for label, values in series:
        values = np.asarray(values, dtype=np.float64)
        if log:
            values = np.where(values > 0, values, np.nan)  # zeros (s* itself) cannot be drawn on a log axis
        profile = step_profile(values, *band)
        if not profile["step"].size:
            continue
        line = ax.plot(profile["step"], profile["mean"], label=_t(f"{label} (mean)"))[0]
        ax.fill_between(
            profile["step"],
            profile["low"],
            profile["high"],
            color=line.get_color(),
            alpha=0.2,
            label=_t(f"{label} ({band[0]:g}-{band[1]:g} percentile)"),
        )
    if log:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    if guide is not None:
        ax.axhline(guide, color="0.4", linestyle="--", linewidth=1)
    ax.set_xlabel(steps_label(step_stride))
    integer_ticks(ax.xaxis)
    ax.set_ylabel(_t(ylabel))
    ax.set_title(_t(title or "Mean convergence over tokens"))
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a legend of nothing makes matplotlib warn
        ax.legend(fontsize=8)
    else:  # every series was NaN (states that blew up) or empty
        ax.text(0.5, 0.5, "no finite values to draw", transform=ax.transAxes, ha="center", va="center")
    return _save_pages(plt, [fig], out)


def exits(
    steps: np.ndarray,
    out: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "Steps to exit",
    notes: tuple[str, ...] = (),
    never: str = "have no step",
) -> list[str]:
    """Histogram of integer step counts (each token's exit step of an adaptive run, or its convergence step).

    ``notes``: more title lines (what s* was). A negative count (a token that never converged) has no bar: a title
    line says how many there are and ``never`` what they did ("never converged within tol=1e-07"), so the bars are
    not read as every token, and a run where none converged says so instead of showing an empty frame."""
    plt, _ = _pyplot()
    everything = np.asarray(steps, dtype=np.int64)
    values = everything[everything >= 0]
    dropped = f"{everything.size - values.size} of {everything.size} tokens {never}"
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    if values.size:
        edges = np.arange(values.min(), values.max() + 2) - 0.5
        ax.hist(values, bins=edges, color="#3b528b", edgecolor="white")
        ax.axvline(values.mean(), color="#fde725", linewidth=2, label=f"mean {values.mean():.1f}")
        ax.legend()
        integer_ticks(ax.xaxis)
        integer_ticks(ax.yaxis)
    else:
        said = dropped if everything.size else "no tokens"
        ax.text(0.5, 0.5, _t(said), transform=ax.transAxes, ha="center", va="center", wrap=True)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(_t(xlabel))
    ax.set_ylabel("Tokens")
    lines = [title or "Steps to exit per token", *notes]
    if values.size < everything.size:
        lines.append(dropped + (" (not drawn)" if values.size else ""))
    ax.set_title("\n".join(_t(line) for line in lines), fontsize=10)  # each line cleaned, the breaks ours
    return _save_pages(plt, [fig], out)


def pca_trajectories(
    trajectories, out: str | os.PathLike, *, title: str | None = None, loop: str | None = None
) -> list[str]:
    """One row per token, one panel per principal-component pair (PC1-PC2, PC3-PC4, PC5-PC6), coloured by step.

    Each trajectory is centred on its own centre of mass; a cross marks s_0 and a star the last state. Steps are
    coloured on a log scale (linear from 0 to 1): late steps crowd s*, and a linear scale would give the few early,
    far-apart ones almost the whole range while the many late ones share one colour. Colours are iterations (a step
    stride stores s_0, s_4, s_8, ...), or stored steps when the tokens' rows hold different iterations (a stride
    with adaptive exit); the star names each token's own last iteration.
    """
    plt, _ = _pyplot()
    from matplotlib.colors import SymLogNorm

    if not trajectories:
        raise LoopscopeError("no trajectories to draw")
    pairs = max(min(t.projections.shape[1] // 2, 3) for t in trajectories)
    if pairs == 0:
        raise LoopscopeError("a PCA plot needs at least 2 components: the trajectories are too short")
    rows = len(trajectories)
    by_iteration = _same_iterations([t.held for t in trajectories])
    colours = [t.held if by_iteration else np.arange(t.projections.shape[0]) for t in trajectories]
    last = max(int(c[-1]) for c in colours)
    norm = SymLogNorm(linthresh=1, linscale=0.5, vmin=0, vmax=max(last, 1), base=10)
    fig, axes = plt.subplots(rows, pairs, figsize=(4 * pairs, 3.6 * rows), constrained_layout=True, squeeze=False)
    scatter = None
    for row, traj, steps in zip(axes, trajectories, colours):
        p = traj.projections
        for pair, ax in enumerate(row):
            i, j = 2 * pair, 2 * pair + 1
            if j >= p.shape[1]:
                ax.set_axis_off()
                continue
            ax.plot(p[:, i], p[:, j], color="0.75", linewidth=0.8, zorder=1)
            scatter = ax.scatter(p[:, i], p[:, j], c=steps, cmap="viridis", norm=norm, s=14, zorder=2)
            ax.scatter(p[0, i], p[0, j], marker="x", color="black", s=40, zorder=3, label="s_0")
            ax.scatter(p[-1, i], p[-1, j], marker="*", color="red", s=80, zorder=3, label=f"s_{int(traj.held[-1])}")
            ax.set_xlabel(f"PC{i + 1} ({percent(traj.explained[i])})")
            ax.set_ylabel(f"PC{j + 1} ({percent(traj.explained[j])})")
            if pair == 0:
                ax.set_title(f"token {traj.token}: {printable(traj.label)}", loc="left", fontsize=10)
                ax.legend(fontsize=7, loc="best")
    scale = "Iteration (log scale)" if by_iteration else "Stored step (log scale; tokens' iterations differ)"
    bar = colour_bar(fig, scatter, axes, with_loop(scale, loop), shrink=0.6)
    bar.set_ticks(_log_steps(max(last, 1)))
    bar.set_ticklabels([str(k) for k in _log_steps(max(last, 1))])
    if title:
        fig.suptitle(_t(with_loop(title, loop)))
    return _save_pages(plt, [fig], out)


def _same_iterations(held: list[np.ndarray]) -> bool:
    """Whether every trajectory's row k holds the same iteration as every other's that has a row k."""
    longest = max(held, key=len)
    return all(np.array_equal(h, longest[: len(h)]) for h in held)


def _log_steps(last: int) -> list[int]:
    """Whole steps 0, 1, 2, 5, 10, 20, 50, ... up to ``last``, and ``last`` itself: the ticks of a log step scale."""
    ticks, step = [0, 1], 2
    while step < last:
        ticks.append(step)
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return sorted(set(ticks + [last]))
