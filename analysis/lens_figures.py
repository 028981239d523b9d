"""Figures of the readout lens (:class:`.lens_result.LensResult`), torch-free: what each stored step would predict,
how far its distribution is from the last step's, and from which iteration each token's prediction stays put.

Laid out like the convergence heatmap of :mod:`.figures` (tokens down, positions on the right axis, one colour
scale shared by every page, the same page files), so the figures of one run can be read side by side. Each
``*_figures`` function returns the matplotlib figures without saving them, for code (and tests) that wants to look
at them; the others save them and return the paths written.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import LoopscopeError
from .figures import (
    ITERATIONS,
    ZERO_MODES,
    _cells,
    _heatmap_page,
    _log_scale,
    _pyplot,
    _save_pages,
    _t,
    check_figure_path,
    printable,
    steps_label,
    token_axes,
)
from .lens_result import LensResult

ROWS_PER_PAGE = 64  # every row of a page keeps its label (figures.MAX_TOKEN_LABELS): each holds text to read
KL_ROWS_PER_PAGE = 128  # as figures.ROWS_PER_PAGE
MAX_STEP_TICKS = 16
ROW_INCHES = 0.22
MAX_INCHES = (120, 60)  # the largest page (width, height): 18000 x 9000 pixels at 150 dpi
LABEL_INCHES = 8 * 1.4 / 72  # a row label of 8 points with its spacing


#: Whitespace and line breaks a predicted token starts or ends with would be invisible in a cell.
def cell_text(text: str, limit: int = 8) -> str:
    """A predicted token as grid cell text: :func:`.figure_axes.printable`, cut shorter."""
    return printable(text, limit)


def prediction_grid(
    result: LensResult, out: str | os.PathLike, *, title: str | None = None, rows_per_page: int = ROWS_PER_PAGE
) -> list[str]:
    """The top-1 prediction of every token at every stored step, as text in a cell coloured by its probability.

    Tokens run down (their text on the left, positions on the right), stored steps across (ticks at their
    iterations); cells past a token's last step stay blank. Font size and cell width follow the number of steps,
    so 64 iterations stay readable; long runs are split into pages as :func:`.figures.heatmap` splits them.
    """
    check_figure_path(out)  # before drawing thousands of cells
    plt, _ = _pyplot()
    return _save_pages(plt, prediction_figures(result, title=title, rows_per_page=rows_per_page), out)


def prediction_figures(result: LensResult, *, title: str | None = None, rows_per_page: int = ROWS_PER_PAGE) -> list:
    """The pages of :func:`prediction_grid`, unsaved (close them with ``matplotlib.pyplot.close``)."""
    from matplotlib.colors import Normalize

    plt, _ = _pyplot()
    probs = _per_step(result, result.top_probs[..., 0])
    texts = _top1_texts(result)
    n_steps = probs.shape[1]
    font, limit = _layout(n_steps)
    cell_width = max(0.4, limit * font * 0.62 / 72 + 0.1)
    legible = n_steps * cell_width + 3.5 <= MAX_INCHES[0]  # past that, cells too narrow for text: colours only
    colour_label = "Probability of the top-1 token (0 to 1)" + ("" if legible else "; too many steps to print them")
    norm = Normalize(vmin=0.0, vmax=1.0)
    labels = [cell_text(label, 16) for label in _row_labels(result)]

    def page(start: int, stop: int, page_title: str):
        rows = stop - start
        width = min(n_steps * cell_width + 3.5, MAX_INCHES[0])
        height = min(max(3.0, max(ROW_INCHES, font * 1.6 / 72) * rows + 1.8), MAX_INCHES[1])
        fig, ax = plt.subplots(figsize=(width, height), constrained_layout=True)
        image = _cells(ax, probs[start:stop], norm)
        every = int(np.ceil(rows * LABEL_INCHES / max(height - 1.8, LABEL_INCHES)))  # every row while labels fit
        _token_axes(fig, ax, image, labels, start, stop, result, colour_label, max(every, 1))
        ax.set_title(page_title)
        # Lay the page out before the cell texts go in, then freeze it (``None``: no engine at all): they sit inside
        # the axes, and a layout engine makes savefig draw every one of them once more just to measure it.
        layout = fig.get_layout_engine()
        if layout is not None:
            layout.execute(fig)
            fig.set_layout_engine(None)
        colours = image.cmap(norm(np.nan_to_num(probs[start:stop])))
        for row in range(rows) if legible else ():
            for k in range(n_steps):
                if texts[start + row][k] is None:
                    continue
                light = 0.299 * colours[row, k, 0] + 0.587 * colours[row, k, 1] + 0.114 * colours[row, k, 2]
                colour = "black" if light > 0.5 else "white"
                ax.text(k, row, texts[start + row][k], ha="center", va="center", fontsize=font, color=colour)
        return fig

    return _pages(result.num_tokens, rows_per_page, title or f"Top-1 prediction per step ({result.kind} lens)", page)


def kl_heatmap(
    result: LensResult,
    out: str | os.PathLike,
    *,
    title: str | None = None,
    zeros: str = "clip",
    rows_per_page: int = KL_ROWS_PER_PAGE,
) -> list[str]:
    """KL(p_k || p_final) per token and stored step on a log colour scale, laid out like the convergence heatmap.

    KL is exactly zero at each token's last step (p_final itself), which a log scale cannot show: ``zeros`` clips
    it to the smallest positive value or leaves it blank, as :func:`.figures.heatmap` does with distance zero.
    """
    check_figure_path(out)
    plt, _ = _pyplot()
    return _save_pages(plt, kl_figures(result, title=title, zeros=zeros, rows_per_page=rows_per_page), out)


def kl_figures(
    result: LensResult, *, title: str | None = None, zeros: str = "clip", rows_per_page: int = KL_ROWS_PER_PAGE
) -> list:
    """The pages of :func:`kl_heatmap`, unsaved."""
    plt, LogNorm = _pyplot()
    if zeros not in ZERO_MODES:
        raise LoopscopeError(f"zeros={zeros!r} is not one of {', '.join(ZERO_MODES)}")
    kl = np.maximum(_per_step(result, result.kl_final), 0.0)  # rounding can leave -1e-9; NaN stays NaN
    norm, shown, _ = _log_scale(kl, zeros, LogNorm)
    note = ""
    if np.any(kl == 0):
        note = "; zeros (the last step) shown at the floor" if zeros == "clip" else "; zeros (the last step) blank"
    labels = _row_labels(result)
    positions = _positions(result)

    def page(start: int, stop: int, page_title: str):
        colour_label = f"KL(p_k || p_final) in nats ({result.kind} lens){note}"
        fig = _heatmap_page(plt, shown[start:stop], norm, start, labels, positions, colour_label, 1)
        _step_ticks(fig.axes[0], result, shown.shape[1])
        fig.axes[0].set_title(page_title)
        return fig

    return _pages(result.num_tokens, rows_per_page, title or f"KL to the final prediction ({result.kind} lens)", page)


def settling_histogram(result: LensResult, out: str | os.PathLike, *, title: str | None = None) -> list[str]:
    """How many tokens settle at each iteration: the first from which the top-1 prediction is the final one."""
    check_figure_path(out)
    plt, _ = _pyplot()
    return _save_pages(plt, [settling_figure(result, title=title)], out)


def settling_figure(result: LensResult, *, title: str | None = None):
    """The figure of :func:`settling_histogram`, unsaved."""
    from matplotlib.ticker import MaxNLocator

    plt, _ = _pyplot()
    if result.num_tokens == 0:
        raise LoopscopeError("nothing to draw: the lens has no tokens")
    every_token = np.asarray(result.settling_iteration, dtype=np.int64)
    values = every_token[every_token >= 0]  # a token whose last state is NaN or infinite never settles
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    if values.size:
        edges = np.arange(values.min(), values.max() + 2) - 0.5
        ax.hist(values, bins=edges, color="#3b528b", edgecolor="white")
        ax.axvline(values.mean(), color="#fde725", linewidth=2, label=f"mean {values.mean():.1f}")
        ax.legend()
        every = _tick_every(len(edges) - 1)
        ax.set_xticks(np.arange(-(-values.min() // every) * every, values.max() + 1, every))
        ax.set_xlim(edges[0], edges[-1])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Settling iteration: the first from which the top-1 prediction is the final one")
    ax.set_ylabel("Tokens")
    unsettled = every_token.size - values.size
    note = f"\n{unsettled} token(s) left out: no prediction at their last step (NaN state)" if unsettled else ""
    ax.set_title(_t((title or f"Settling iteration per token ({result.kind} lens)") + note))
    return fig


# ---- helpers -------------------------------------------------------------------------------------------------------


def _per_step(result: LensResult, values: np.ndarray) -> np.ndarray:
    """[T, K] float64 with every slot past a token's last step NaN (drawn blank), whatever the array held there."""
    v = np.array(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise LoopscopeError("nothing to draw: the lens has no tokens or no steps")
    v[np.arange(v.shape[1])[None, :] > np.asarray(result.last)[:, None]] = np.nan
    return v


def _top1_texts(result: LensResult) -> list[list[str | None]]:
    """Each cell's text (the predicted token's, else its id); None past a token's last step."""
    ids, n_steps = result.top1, result.top_ids.shape[1]
    _, limit = _layout(n_steps)
    texts: list[list[str | None]] = []
    for t in range(result.num_tokens):
        row: list[str | None] = []
        for k in range(n_steps):
            if k > int(result.last[t]) or ids[t, k] < 0:
                row.append(None)
            elif result.top1_text is not None:
                row.append(cell_text(str(result.top1_text[t, k]), limit))
            else:
                row.append(str(int(ids[t, k])))
        texts.append(row)
    return texts


def _layout(n_steps: int) -> tuple[float, int]:
    """(font size, characters per cell) of the grid: smaller and shorter as the steps grow, to stay readable."""
    return float(np.clip(12 - n_steps / 8, 5.5, 9)), 6 if n_steps > 32 else 8 if n_steps > 12 else 10


def _positions(result: LensResult) -> np.ndarray:
    return np.arange(result.num_tokens) if result.positions is None else np.asarray(result.positions)


def _row_labels(result: LensResult) -> list[str]:
    """Each row's label: its token's text, else its position; the same on every page."""
    if result.tokens is not None and len(result.tokens) >= result.num_tokens:
        return [str(token) for token in result.tokens]
    return [str(int(p)) for p in _positions(result)]


def _step_ticks(ax, result: LensResult, n_steps: int) -> None:
    """At most MAX_STEP_TICKS ticks on cells, each labelled with the iteration its stored step holds; when tokens
    hold different iterations in one slot (a step stride with adaptive exit), with the stored step, as
    :func:`.figures.heatmap` labels it."""
    shared = result.shared_steps
    ticks = np.arange(0, n_steps, _tick_every(n_steps))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(int(k if shared is None else shared[k])) for k in ticks])
    if shared is not None:
        ax.set_xlabel(ITERATIONS)
    else:
        ax.set_xlabel(steps_label(result.step_stride) if result.step_stride > 1 else "Stored step")


def _tick_every(n: int) -> int:
    """The round spacing (1, 2, 5, 10, 20, 50, ...) that puts at most MAX_STEP_TICKS ticks on ``n`` integers."""
    every = 1
    while n > every * MAX_STEP_TICKS:
        every = every * 5 // 2 if str(every)[0] == "2" else every * 2
    return every


def _token_axes(fig, ax, image, labels, start, stop, result: LensResult, colour_label: str, every: int) -> None:
    """The grid's axes: iterations along x, token labels left and positions right (every ``every``-th row), and
    the colour bar."""
    _step_ticks(ax, result, image.get_array().shape[1])
    right = token_axes(ax, stop - start, start, labels, _positions(result), label=str, every=every)
    fig.colorbar(image, ax=[ax, right], pad=0.02, fraction=0.03).set_label(_t(colour_label))


def _pages(n_tokens: int, rows_per_page: int, title: str, page) -> list:
    """``page(start, stop, title)`` for each run of ``rows_per_page`` tokens, titled as :func:`.figures.heatmap`
    titles its pages."""
    if n_tokens == 0:
        raise LoopscopeError("nothing to draw: the lens has no tokens")
    if rows_per_page < 1:
        raise LoopscopeError(f"rows_per_page={rows_per_page} must be at least 1")
    bounds = [(start, min(start + rows_per_page, n_tokens)) for start in range(0, n_tokens, rows_per_page)]
    figures = []
    for number, (start, stop) in enumerate(bounds, 1):
        page_title = title
        if len(bounds) > 1:
            page_title += f" (tokens {start}-{stop - 1}, page {number}/{len(bounds)})"
        figures.append(page(start, stop, _t(page_title)))
    return figures
