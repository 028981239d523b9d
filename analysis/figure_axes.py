"""The parts every figure of :mod:`.figures` and :mod:`.lens_figures` is built from: axes, ticks, labels, pages.

Kept apart from the figures themselves so that a short figure (ten tokens, two steps) and a long one (pages of
128 tokens) get the same integer ticks, the same row labels and colour-bar labels that fit the canvas.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import LoopscopeError
from ..storage import schema
from ..storage.outputs import write_whole
from ..storage.safety import clean
from ..storage.safety import figure_text as _t  # titles and labels hold file names, signal names, model text

FORMATS = (".png", ".pdf", ".svg")
MAX_TOKEN_LABELS = 64
DPI = 150  # raster figures (PNG): sharp on a high-density screen, a few hundred KB a page
ITERATIONS = "Iterations at Test-Time"
PROMPT_NOTE = "red line: prompt above, generated tokens below"
NO_READOUT = ("identity", "none")  # readout kinds under which the "readout space" is the state space itself


def steps_label(step_stride: int = 1) -> str:
    """The x axis: iterations, or with a step stride the stored steps (which are not iterations)."""
    if step_stride == 1:
        return ITERATIONS
    return f"Stored step: s0, then 1 in {step_stride} iterations, then each token's last"


def space_text(space: str, readout: str | None = None) -> str:
    """The space distances were taken in; a model whose readout is the identity (or unknown) has only states."""
    if readout in NO_READOUT:
        return "state space (the model has no readout norm)"
    return f"{space} space"


def with_loop(text: str, loop: str | None) -> str:
    """``text`` naming the loop drawn: a capture with several loops (HRM-Text's H and L) needs it said."""
    return text if loop is None else f"{text} [loop {loop}]"


def percent(fraction: float) -> str:
    """An explained-variance fraction with enough digits to tell small components apart ('0.04%', '<0.01%')."""
    value = 100 * float(fraction)
    if value <= 0:
        return "0%"
    if value < 0.01:
        return "<0.01%"
    return f"{value:.2f}%" if value < 1 else f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def check_figure_path(out: str | os.PathLike) -> Path:
    """A figure path with a known extension in an existing directory, or a one-line error saying what to do."""
    return checked_output(out, FORMATS, "use a .png, .pdf or .svg file name")


def checked_output(out: str | os.PathLike, suffixes: tuple[str, ...], advice: str) -> Path:
    """A path ending in one of ``suffixes`` in an existing directory, or a one-line error (``advice`` for a wrong
    suffix) saying what to do: checked before any work, so a typo costs nothing."""
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise LoopscopeError(f"{path}: {advice}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LoopscopeError(f"{path}: directory {parent} does not exist; create it first")
    if path.is_dir() and not path.is_symlink():
        raise LoopscopeError(f"{path} is a directory; name a file to write")
    return path


def refuse_capture_files(capture, outputs) -> None:
    """Refuse ``outputs`` that are ``capture``'s own files (``export`` refuses the same): writing one would destroy
    the data it was drawn from."""
    from ..storage import dependencies

    dependencies.refuse_outputs(capture, outputs, "writing it would destroy the capture")


def nonfinite_note(metrics) -> str | None:
    """Which tokens blew up (NaN or infinite states), or None: their blank cells and empty CSV cells need saying."""
    bad = metrics.nonfinite_tokens()
    if not bad.size:
        return None
    return (
        f"run {metrics.run}: {bad.size} token(s) have NaN or infinite states (first: token {int(bad[0])}); "
        "they are left blank in figures and empty in CSV"
    )


#: Blanks and line breaks as visible signs: a token's leading space is part of it, and must show in a label.
VISIBLE = {" ": "␣", "\n": "⏎", "\r": "↵", "\t": "⇥"}


def printable(token: str, limit: int = 16, *, matplotlib: bool = True) -> str:
    """A token as a label or cell text: blanks and line breaks visible (``␣``, ``⏎``), other control characters
    escaped, mathtext off (``matplotlib=False``: text for other renderers, ``$`` as it is), cut with an ellipsis
    past ``limit`` characters."""
    text = "".join(VISIBLE.get(c) or (c if c.isprintable() else repr(c)[1:-1]) for c in str(token))
    if matplotlib:
        text = text.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    text = text or '""'
    return text if len(text) <= limit else text[: max(limit - 1, 1)] + "…"


def integer_ticks(axis) -> None:
    """Ticks on whole numbers only: steps and token counts have no -0.5 or 0.5 (a short run's default)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def colour_bar(fig, image, axes, label: str, **kwargs):
    """A colour bar whose label fits the figure's height: wrapped onto more lines on a short figure."""
    bar = fig.colorbar(image, ax=axes, **kwargs)
    bar.set_label(_t(label))
    fit_label(fig, bar.ax.yaxis.label)
    return bar


def fit_label(fig, text) -> None:
    """Wrap a vertical label until it is no taller than the figure less its margins (measured, not guessed)."""
    words = text.get_text()
    renderer = fig.canvas.get_renderer()
    room = fig.bbox.height - 0.5 * fig.dpi
    for width in (len(words), 60, 48, 40, 32, 26, 20, 16, 12):
        text.set_text(textwrap.fill(words, width, break_long_words=False) if width < len(words) else words)
        if text.get_window_extent(renderer).height <= room:
            return


def prompt_line(ax, prompt: int | None, start: int, stop: int) -> bool:
    """Draw the line between a generate() run's prompt rows and its generated ones if the first generated row is
    one of rows ``start:stop`` (a prompt ending with a page is marked on the next, not on this one's lower edge);
    says whether it did."""
    if prompt is None or not marks_prompt(prompt, start, stop):
        return False
    ax.axhline(prompt - start - 0.5, color="red", linewidth=1.5)
    return True


def marks_prompt(prompt: int | None, start: int, stop: int) -> bool:
    """Whether rows ``start:stop`` hold the first generated row, where :func:`prompt_line` draws its line."""
    return prompt is not None and start <= prompt < stop


class _AggFigures:
    """What the figure functions asked of pyplot (``subplots``, ``close``), on matplotlib's Agg canvas without pyplot.

    pyplot keeps global state: selecting a backend for it would switch a notebook's (its figures closed, later plots
    no longer inline), and its figure registry is not thread-safe. A :class:`~matplotlib.figure.Figure` with its own
    canvas needs neither, saves to PNG, PDF and SVG alike, and is freed like any object.
    """

    @staticmethod
    def subplots(nrows: int = 1, ncols: int = 1, *, squeeze: bool = True, **figure_options):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(**figure_options)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(nrows, ncols, squeeze=squeeze)

    @staticmethod
    def close(fig) -> None:
        """Nothing to do: pyplot held a reference to release; this figure is freed with its last reference."""


def _pyplot():
    """(figure factory, LogNorm): the drawing kit of the figure functions, loaded on first use (matplotlib is slow)."""
    from matplotlib.colors import LogNorm

    return _AggFigures, LogNorm


def _cmap():
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad="white")


def _log_scale(d: np.ndarray, zeros: str, LogNorm, floor: float | None = None):
    """(shared LogNorm, array to draw, colour-bar note) for distances ``d`` under the chosen zero handling.
    ``floor``: where clipped zeros go, when a colour scale shared with other data sets it (a compare panel).
    Clipped zeros go a decade below the smallest distance, so s* never shares a colour with its nearest state
    (with one iteration, or distances within a decade, it once took the colour of every other cell)."""
    positive = d[np.isfinite(d) & (d > 0)]
    has_zeros = bool(np.any(d == 0))
    if floor is None:
        floor = float(positive.min()) if positive.size else 1e-12
        floor = floor / 10 if has_zeros and zeros == "clip" and positive.size else floor
    ceiling = float(positive.max()) if positive.size else 1.0
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


def token_axes(
    ax, rows: int, start: int, tokens, positions, label: Callable[[str], str] = printable, every: int | None = None
):
    """Rows ``start:start + rows`` of a run labelled the same on every page: the token's text on the left (its
    index in the run when there is none), its position on the right; rows past the run's end stay unlabelled.
    ``every``: label every n-th row (default: as many as fit MAX_TOKEN_LABELS). Returns the right-hand axes."""
    count = len(positions) if positions is not None else len(tokens) if tokens is not None else start + rows
    shown = _label_rows(rows) if every is None else np.arange(0, rows, every)
    ticks = np.array([i for i in shown if start + i < count], dtype=np.int64)
    ax.set_yticks(ticks)
    if tokens is not None and len(tokens) >= count:
        ax.set_yticklabels([label(str(tokens[start + i])) for i in ticks], fontsize=8)
        ax.set_ylabel("Token")
    else:
        ax.set_yticklabels([str(start + i) for i in ticks], fontsize=8)
        ax.set_ylabel("Token (index in the run)")
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(ticks)
    where = np.arange(count) if positions is None else np.asarray(positions)
    right.set_yticklabels([str(int(where[start + i])) for i in ticks], fontsize=8)
    right.set_ylabel("Position")
    return right


def _heatmap_page(plt, shown, norm, start, tokens, labels, colour_label, step_stride, *, prompt=None, label=printable):
    """One page of rows: cells, integer step ticks, token and position axes, the prompt line and the colour bar."""
    rows = shown.shape[0]
    fig, ax = plt.subplots(figsize=(9, max(_height(rows), 3.0)), constrained_layout=True)
    image = _cells(ax, shown, norm)
    ax.set_xlabel(steps_label(step_stride))
    integer_ticks(ax.xaxis)
    right = token_axes(ax, rows, start, tokens, labels, label)
    prompt_line(ax, prompt, start, start + rows)
    colour_bar(fig, image, [ax, right], colour_label, pad=0.08)
    return fig


def _save_pages(plt, figures, out) -> list[str]:
    """One figure -> ``out``; several -> pages of one PDF, or numbered files for PNG/SVG. Each file is written
    beside it and renamed into place (``write_whole``): a link at ``out`` is replaced, never written through."""
    path = check_figure_path(out)
    kind = path.suffix.lower()[1:]
    written = []
    try:
        if len(figures) == 1:
            write_whole(path, lambda partial: figures[0].savefig(partial, dpi=DPI, format=kind))
            written.append(os.fspath(path))
        elif kind == "pdf":
            write_whole(path, lambda partial: _pdf_pages(figures, partial))
            written.append(os.fspath(path))
        else:
            for number, fig in enumerate(figures, 1):
                page = path.with_name(f"{path.stem}-p{number:02d}{path.suffix}")
                write_whole(page, lambda partial, fig=fig: fig.savefig(partial, dpi=DPI, format=kind))
                written.append(os.fspath(page))
    finally:
        for fig in figures:
            plt.close(fig)
    _remove_stale(path, kind, 0 if len(written) == 1 else len(written))
    return written


#: How each format's files begin: a file is removed as an older page only if it is one (never a capture's HDF5).
_MAGIC = {"png": (b"\x89PNG\r\n\x1a\n",), "svg": (b"<?xml", b"<svg"), "pdf": (b"%PDF-",)}


def _remove_stale(path: Path, kind: str, pages: int) -> None:
    """Remove what an earlier drawing to ``path`` left that this one did not overwrite: with ``pages`` pages, the
    single ``<stem><suffix>`` and pages numbered past them; as one file (``pages`` 0), every ``<stem>-pNN<suffix>``.
    Otherwise the folder would mix two figures' pages. Only regular files (no link) holding this format's data are
    removed; anything else of such a name is left, and one warning says so."""
    import re
    import warnings

    folder = path.parent
    pattern = re.compile(re.escape(path.stem) + r"-p(\d{2,})" + re.escape(path.suffix))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    stale = [path] if pages else []
    stale += [folder / n for n in names if (m := pattern.fullmatch(n)) is not None and int(m.group(1)) > pages]
    left = [p for p in stale if os.path.lexists(p) and not _remove_figure(p, kind)]
    if left:
        warnings.warn(
            f"loopscope: left {len(left)} file(s) named like pages of {clean(path)} from an earlier figure, which are "
            f"not {kind.upper()} files loopscope wrote (first: {clean(left[0])}); remove them by hand",
            stacklevel=3,
        )


def _remove_figure(path: Path, kind: str) -> bool:
    """Unlink ``path`` if it is a regular file (not a link) beginning as a ``kind`` figure does; whether it went."""
    import stat

    try:  # no link followed, and a FIFO swapped in is never waited on
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode) or not os.read(fd, 16).startswith(_MAGIC[kind]):
            return False
        os.unlink(path)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _pdf_pages(figures, path: str) -> None:
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        for fig in figures:
            pdf.savefig(fig)


def prompt_rows(run) -> int | None:
    """How many of a decoding run's rows are its prompt (the first forward's tokens), if it has both kinds: a
    generate() run's, or one of a family's decoder called by name (Huginn's generate_minimal, ...)."""
    call = schema.as_text(run.attrs.get("call"))  # None when not text (a damaged attribute)
    if call is None or call in schema.PREFILL_CALLS:  # one pass over the prompt: every token is prompt
        return None
    prompt = int(np.sum(run.forward_index == 0))
    return prompt if 0 < prompt < run.num_tokens else None
