"""Figures in the style of the Huginn paper, drawn with matplotlib (Agg backend: no display needed).

Every function takes arrays (from :mod:`.metrics` or :mod:`.pca`), writes the figure in the format its file
extension names (.png, .pdf, .svg) and returns the paths written. Iterations run along x, labelled
"Iterations at Test-Time" as in the paper; distances are drawn on a log scale.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LoopscopeError
from ..storage.safety import figure_text as _t  # titles and labels hold file names, signal names, model text

FORMATS = (".png", ".pdf", ".svg")
ZERO_MODES = ("clip", "drop")
MAX_TOKEN_LABELS = 64
ROWS_PER_PAGE = 128
ITERATIONS = "Iterations at Test-Time"


def steps_label(step_stride: int = 1) -> str:
    """The x axis: iterations, or with a step stride the stored steps (which are not iterations)."""
    if step_stride == 1:
        return ITERATIONS
    return f"Stored step: s0, then 1 in {step_stride} iterations, then each token's last"


def check_figure_path(out: str | os.PathLike) -> Path:
    """A figure path with a known extension in an existing directory, or a one-line error saying what to do."""
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise LoopscopeError(f"{path}: use a .png, .pdf or .svg file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LoopscopeError(f"{path}: directory {parent} does not exist; create it first")
    return path


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
) -> list[str]:
    """Convergence heatmap: tokens down the y axis, iterations along x, log-scaled ||s_k - s*|| (viridis).

    Token strings label the left axis and positions the right one. A distance of exactly zero (a token's last step
    when s* is its own final state) has no place on a log scale: ``zeros="clip"`` shows it at the smallest positive
    distance, ``zeros="drop"`` leaves it blank and drops trailing columns that hold nothing else; the colour bar
    says which. Longer sequences are split into pages of ``rows_per_page`` tokens sharing one colour scale: pages
    of one PDF, or ``name-p01.png``, ``name-p02.png``, ... for PNG and SVG.
    """
    plt, LogNorm = _pyplot()
    if zeros not in ZERO_MODES:
        raise LoopscopeError(f"zeros={zeros!r} is not one of {', '.join(ZERO_MODES)}")
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise LoopscopeError("nothing to draw: the run has no tokens or no iterations")
    norm, shown, note = _log_scale(d, zeros, LogNorm)
    colour_label = f"||s - s*|| ({space} space, s* = {reference}){note}"
    title = title or "Convergence of the latent state"
    return _paged(plt, shown, norm, out, tokens, positions, colour_label, title, rows_per_page, step_stride)


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
    return _paged(plt, shown, norm, out, tokens, positions, name, title or f"Signal {name}", rows_per_page, step_stride)


def _paged(plt, shown, norm, out, tokens, positions, colour_label, title, rows_per_page, step_stride) -> list[str]:
    """Token rows in pages of ``rows_per_page`` sharing one colour scale."""
    n_tokens = shown.shape[0]
    labels = np.arange(n_tokens) if positions is None else np.asarray(positions)
    pages = [(start, min(start + rows_per_page, n_tokens)) for start in range(0, n_tokens, max(rows_per_page, 1))]
    figures = []
    for number, (start, stop) in enumerate(pages, 1):
        fig = _heatmap_page(plt, shown[start:stop], norm, start, tokens, labels, colour_label, step_stride)
        page_title = title
        if len(pages) > 1:
            page_title += f" (tokens {start}-{stop - 1}, page {number}/{len(pages)})"
        fig.axes[0].set_title(_t(page_title))
        figures.append(fig)
    return _save_pages(plt, figures, out)


def compare(
    first: np.ndarray,
    second: np.ndarray,
    out: str | os.PathLike,
    *,
    titles: tuple[str, str] = ("A", "B"),
    tokens: list[str] | None = None,
    reference: str = "final",
    space: str = "readout",
    zeros: str = "clip",
    step_strides: tuple[int, int] = (1, 1),
) -> list[str]:
    """Two convergence heatmaps side by side on one colour scale (e.g. 32 vs 64 iterations, or two prompts)."""
    plt, LogNorm = _pyplot()
    a, b = (np.asarray(x, dtype=np.float64) for x in (first, second))
    norm, _, note = _log_scale(np.concatenate([a.ravel(), b.ravel()])[None, :], zeros, LogNorm)
    rows = max(a.shape[0], b.shape[0])
    fig, axes = plt.subplots(
        1, 2, figsize=(14, _height(min(rows, ROWS_PER_PAGE))), constrained_layout=True, squeeze=True
    )
    image = None
    for ax, d, name, stride in zip(axes, (a, b), titles, step_strides):
        _, shown, _ = _log_scale(d, zeros, LogNorm)
        image = _cells(ax, shown, norm)
        ax.set_xlabel(steps_label(stride))
        ax.set_title(_t(name))
        rows_shown = _label_rows(d.shape[0])
        ax.set_yticks(rows_shown)
        if tokens is not None and len(tokens) >= d.shape[0]:
            ax.set_yticklabels([printable(tokens[i]) for i in rows_shown], fontsize=8)
    axes[0].set_ylabel("Token")
    fig.colorbar(image, ax=list(axes)).set_label(_t(f"||s - s*|| ({space} space, s* = {reference}){note}"))
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
    ax.set_ylabel(_t(ylabel))
    ax.set_title(_t(title or "Mean convergence over tokens"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save_pages(plt, [fig], out)


def exits(
    steps: np.ndarray,
    out: str | os.PathLike,
    *,
    title: str | None = None,
    xlabel: str = "Steps to exit",
) -> list[str]:
    """Histogram of integer step counts (each token's exit step of an adaptive run, or its convergence step)."""
    plt, _ = _pyplot()
    values = np.asarray(steps, dtype=np.int64)
    values = values[values >= 0]
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    if values.size:
        edges = np.arange(values.min(), values.max() + 2) - 0.5
        ax.hist(values, bins=edges, color="#3b528b", edgecolor="white")
        ax.axvline(values.mean(), color="#fde725", linewidth=2, label=f"mean {values.mean():.1f}")
        ax.legend()
    ax.set_xlabel(_t(xlabel))
    ax.set_ylabel("Tokens")
    ax.set_title(_t(title or "Steps to exit per token"))
    return _save_pages(plt, [fig], out)


def pca_trajectories(trajectories, out: str | os.PathLike, *, title: str | None = None) -> list[str]:
    """One row per token, one panel per principal-component pair (PC1-PC2, PC3-PC4, PC5-PC6), coloured by step.

    Each trajectory is centred on its own centre of mass; a cross marks s_0 and a star the last state.
    """
    plt, _ = _pyplot()
    if not trajectories:
        raise LoopscopeError("no trajectories to draw")
    pairs = max(min(t.projections.shape[1] // 2, 3) for t in trajectories)
    if pairs == 0:
        raise LoopscopeError("a PCA plot needs at least 2 components: the trajectories are too short")
    rows = len(trajectories)
    fig, axes = plt.subplots(rows, pairs, figsize=(4 * pairs, 3.6 * rows), constrained_layout=True, squeeze=False)
    scatter = None
    for row, traj in zip(axes, trajectories):
        p = traj.projections
        steps = np.arange(p.shape[0])
        for pair, ax in enumerate(row):
            i, j = 2 * pair, 2 * pair + 1
            if j >= p.shape[1]:
                ax.set_axis_off()
                continue
            ax.plot(p[:, i], p[:, j], color="0.75", linewidth=0.8, zorder=1)
            scatter = ax.scatter(p[:, i], p[:, j], c=steps, cmap="viridis", s=14, zorder=2)
            ax.scatter(p[0, i], p[0, j], marker="x", color="black", s=40, zorder=3, label="s_0")
            ax.scatter(p[-1, i], p[-1, j], marker="*", color="red", s=80, zorder=3, label=f"s_{p.shape[0] - 1}")
            ax.set_xlabel(f"PC{i + 1} ({traj.explained[i]:.0%})")
            ax.set_ylabel(f"PC{j + 1} ({traj.explained[j]:.0%})")
            if pair == 0:
                ax.set_title(f"token {traj.token}: {printable(traj.label)}", loc="left", fontsize=10)
                ax.legend(fontsize=7, loc="best")
    fig.colorbar(scatter, ax=axes, shrink=0.6).set_label("Iteration")
    if title:
        fig.suptitle(_t(title))
    return _save_pages(plt, [fig], out)


def printable(token: str) -> str:
    """A token as a tick label: control characters escaped, blanks quoted, mathtext off, long ones cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    text = text if text.strip() else repr(text)
    text = text.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    return text if len(text) <= 16 else text[:15] + "…"


# ---- helpers -------------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    return plt, LogNorm


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="white")


def _log_scale(d: np.ndarray, zeros: str, LogNorm):
    """(shared LogNorm, array to draw, colour-bar note) for distances ``d`` under the chosen zero handling."""
    positive = d[np.isfinite(d) & (d > 0)]
    floor = float(positive.min()) if positive.size else 1e-12
    ceiling = float(positive.max()) if positive.size else 1.0
    has_zeros = bool(np.any(d == 0))
    if zeros == "clip":
        shown = np.where(d == 0, floor, d)
        note = "; zeros (s* itself) shown at the floor" if has_zeros else ""
    else:
        shown = np.where(d == 0, np.nan, d)
        filled = np.nonzero(np.isfinite(shown).any(axis=0))[0]
        shown = shown[:, : filled.max() + 1] if filled.size else shown
        note = "; zeros (s* itself) dropped" if has_zeros else ""
    norm = LogNorm(vmin=floor, vmax=max(ceiling, floor * 10))
    return norm, np.ma.masked_invalid(shown), note


def _height(rows: int) -> float:
    return min(max(2.5, 0.22 * rows + 1.5), 40)


def _cells(ax, shown: np.ndarray, norm):
    """One cell per token and step, centred on integer coordinates (so ticks fall on cells)."""
    rows, n_steps = shown.shape
    extent = (-0.5, n_steps - 0.5, rows - 0.5, -0.5)
    return ax.imshow(shown, aspect="auto", interpolation="nearest", cmap=_cmap(), norm=norm, extent=extent)


def _label_rows(n: int) -> np.ndarray:
    return np.arange(0, n, max(1, int(np.ceil(n / MAX_TOKEN_LABELS))))


def _heatmap_page(plt, shown, norm, start, tokens, labels, colour_label, step_stride):
    rows = shown.shape[0]
    fig, ax = plt.subplots(figsize=(9, _height(rows)), constrained_layout=True)
    image = _cells(ax, shown, norm)
    ax.set_xlabel(steps_label(step_stride))
    ax.set_ylabel("Token")
    ticks = _label_rows(rows)
    ax.set_yticks(ticks)
    if tokens is not None:
        ax.set_yticklabels([printable(tokens[start + i]) for i in ticks], fontsize=8)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ticks)
    right.set_yticklabels([str(int(labels[start + i])) for i in ticks], fontsize=8)
    right.set_ylabel("Position")
    fig.colorbar(image, ax=[ax, right], pad=0.08).set_label(_t(colour_label))
    return fig


def _save_pages(plt, figures, out) -> list[str]:
    """One figure -> ``out``; several -> pages of one PDF, or numbered files for PNG/SVG."""
    path = check_figure_path(out)
    written = []
    try:
        if len(figures) == 1:
            figures[0].savefig(path, dpi=150)
            written.append(os.fspath(path))
        elif path.suffix.lower() == ".pdf":
            from matplotlib.backends.backend_pdf import PdfPages

            with PdfPages(path) as pdf:
                for fig in figures:
                    pdf.savefig(fig)
            written.append(os.fspath(path))
        else:
            for number, fig in enumerate(figures, 1):
                page = path.with_name(f"{path.stem}-p{number:02d}{path.suffix}")
                fig.savefig(page, dpi=150)
                written.append(os.fspath(page))
    except OSError as exc:
        raise LoopscopeError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for fig in figures:
            plt.close(fig)
    return written
