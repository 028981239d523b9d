"""Figures in the style of the Huginn paper, drawn with matplotlib (Agg backend: no display needed)."""

from __future__ import annotations

import os

import numpy as np

MAX_TOKEN_LABELS = 64


def heatmap(
    distances: np.ndarray,
    out: str | os.PathLike,
    *,
    tokens: list[str] | None = None,
    positions: np.ndarray | None = None,
    title: str | None = None,
    reference: str = "final",
    space: str = "readout",
) -> str:
    """Convergence heatmap: tokens down the y axis, iterations along x, log-scaled ||s_k - s*|| (viridis).

    Token strings label the left axis and token positions the right one. Distances of exactly zero (the last
    step when s* is the final state itself) cannot be shown on a log scale: they are clipped to the smallest
    positive distance, and the colour bar says so. Returns the path written (format from the extension).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    d = np.asarray(distances, dtype=np.float64)
    n_tokens, n_steps = d.shape
    positive = d[np.isfinite(d) & (d > 0)]
    floor = positive.min() if positive.size else 1e-12
    ceiling = positive.max() if positive.size else 1.0
    clipped = bool(np.any(d == 0))
    shown = np.where(d == 0, floor, d)
    shown = np.ma.masked_invalid(shown)

    height = min(max(2.5, 0.22 * n_tokens + 1.5), 40)
    fig, ax = plt.subplots(figsize=(9, height), constrained_layout=True)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(
        shown,
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        norm=LogNorm(vmin=floor, vmax=max(ceiling, floor * 10)),
        extent=(-0.5, n_steps - 0.5, n_tokens - 0.5, -0.5),
    )
    ax.set_xlabel("Iterations at Test-Time")
    ax.set_ylabel("Token")
    stride = max(1, int(np.ceil(n_tokens / MAX_TOKEN_LABELS)))
    rows = np.arange(0, n_tokens, stride)
    ax.set_yticks(rows)
    if tokens is not None:
        ax.set_yticklabels([_printable(tokens[i]) for i in rows], fontsize=8)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(rows)
    labels = positions if positions is not None else np.arange(n_tokens)
    right.set_yticklabels([str(int(labels[i])) for i in rows], fontsize=8)
    right.set_ylabel("Position")
    label = f"||s - s*|| ({space} space, s* = {reference})"
    if clipped:
        label += "; zeros shown at the floor"
    colorbar = fig.colorbar(image, ax=[ax, right], pad=0.08)
    colorbar.set_label(label)
    if title:
        ax.set_title(title)
    out = os.fspath(out)
    fig.savefig(out, dpi=150)
    plt.close(fig)
    return out


def _printable(token: str) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in token)
    text = text if text.strip() else repr(text)
    text = text.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    return text if len(text) <= 16 else text[:15] + "…"
