"""Jupyter's view of a capture: the HTML that ``CaptureFile._repr_html_`` and ``Run._repr_html_`` return.

Storage is the lower layer and draws nothing (figures belong to analysis, which imports storage), so a run's
summary ends with whatever the functions registered here add: :func:`register_run_figure` is the seam. The package
registers its inline convergence heatmap there (``loopscope/notebook.py``) when ``import loopscope`` runs, and
anyone may register another. Importing this module costs next to nothing (``import loopscope`` does); the
reader's modules load when a summary is written.

Every value from a file (paths, model names, token text, error messages) is escaped, and nothing here raises into
Jupyter: a run that cannot be read shows its status, and a figure that fails, a one-line note.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .reader import CaptureFile
    from .run import Run

MAX_ROWS = 20  # runs listed in a capture's table; the rest are counted
MAX_TEXT = 200  # characters of a run's text in its summary, and of an error message
RUN_COLUMNS = ("run", "call", "tokens", "steps (min-max)", "dtype", "status", "size")
STYLE = "font-size: 0.9em; margin: 0.2em 0"
VISIBLE = {"\n": "⏎", "\r": "↵", "\t": "⇥"}  # line breaks in a run's text, shown on its one line

#: Functions ``render(run) -> HTML`` whose output follows a run's summary, in the order they were registered.
RunFigure = Callable[["Run"], str]
_run_figures: list[RunFigure] = []


def register_run_figure(render: RunFigure) -> RunFigure:
    """Show ``render(run)`` under every run's HTML summary (registered once; usable as a decorator). It returns
    HTML with its own values escaped; whatever it raises becomes a one-line note under the summary instead."""
    if render not in _run_figures:
        _run_figures.append(render)
    return render


def unregister_run_figure(render: RunFigure) -> None:
    """Stop showing ``render``'s output (nothing happens if it was not registered)."""
    if render in _run_figures:
        _run_figures.remove(render)


def capture_html(capture: CaptureFile) -> str:
    """A capture's header (file, model, family, loops) and a table of its first :data:`MAX_ROWS` runs, complete,
    incomplete or damaged."""
    try:
        return _capture_html(capture)
    except Exception as exc:  # a summary must never raise into Jupyter
        return f"<p>loopscope capture <code>{_e(capture.path)}</code></p>{_note('summary not written', exc)}"


def run_html(run: Run) -> str:
    """A run's summary, then the registered figures (none for a run whose file cannot be read)."""
    try:
        rows, readable = _run_rows(run)
    except Exception as exc:
        return f"<p>loopscope run {_e(run.index)}</p>{_note('summary not written', exc)}"
    parts = [f"<div><strong>loopscope run {run.index}</strong> of <code>{_e(run.capture.path)}</code>", _table(rows)]
    if readable:
        for render in list(_run_figures):
            try:
                parts.append(render(run))
            except Exception as exc:
                parts.append(_note("figure not drawn", exc))
    return "\n".join(parts) + "</div>"


# ---- the capture ------------------------------------------------------------------------------------------------
def _capture_html(capture: CaptureFile) -> str:
    from . import run_files

    meta = capture.meta
    files = run_files.list_run_files(capture.path)
    loop = meta.get("loop_json")
    loop = loop if isinstance(loop, dict) else {}  # damaged: kept as text by ``meta``
    header = [
        ("model", f"{meta.get('model_class', '?')} {meta.get('name_or_path', '')}".rstrip()),
        ("family", loop.get("family", "?")),
        ("loops", ", ".join(capture.loop_names) or "-"),
        ("created", f"{meta.get('created', '?')} with loopscope {meta.get('loopscope_version', '?')}"),
    ]
    merged = meta.get("merged_from_json")
    if isinstance(merged, list):
        header.append(("merged from", f"{len(merged)} capture(s); states are read from their files"))
    total = files_size(capture.path, *(path for path, _ in files.values()))
    intro = (
        f"<div><strong>loopscope capture</strong> <code>{_e(capture.path)}</code> "
        f"&middot; format v{_e(meta.get('format_version', '?'))} &middot; {_e(total)}"
    )
    complete = {run.index: run for run in capture.runs}
    numbers = list(files)
    rows = [_capture_row(number, complete.get(number), files[number]) for number in numbers[:MAX_ROWS]]
    table = _grid(RUN_COLUMNS, rows) if rows else "<p>no runs</p>"
    more = ""
    if len(numbers) > MAX_ROWS:
        more = f"<p>... {len(numbers) - MAX_ROWS} more run(s) (<code>capture.run(n)</code> shows run n)</p>"
    return "\n".join([intro, _table(header), table, more]) + "</div>"


def _capture_row(number: int, run: Run | None, file: tuple[str, bool]) -> list[str]:
    """One row of the runs table; a run file that cannot be read is a row saying so, never an exception."""
    path, complete = file
    blank = ["-", "-", "-", "-"]
    if not complete:
        return [str(number), *blank, "incomplete", files_size(path)]
    if run is None:  # completed after the capture was opened
        return [str(number), *blank, "complete (reopen the capture to read it)", files_size(path)]
    try:
        run.check()  # every loop, not only the first one the cells below read
        merged = "source_file" in run.attrs
        cells = [_call(run), str(run.num_tokens), steps_text(run), run.logical_dtype() if run.loops else "-"]
    except Exception as exc:
        return [str(number), *blank, f"damaged: {_first_line(exc, path)}", files_size(path)]
    return [str(number), *cells, "complete", files_size(path) + (" + source" if merged else "")]


# ---- one run ----------------------------------------------------------------------------------------------------
def _run_rows(run: Run) -> tuple[list[tuple[str, str]], bool]:
    """(label, text) rows of a run's summary, and whether its file could be read."""
    file = ("file", f"{os.path.basename(run.path)}, {files_size(run.path)}")
    try:
        rows = _readable_run_rows(run)
    except Exception as exc:
        return [("status", f"damaged: {_first_line(exc, run.path)}"), file], False
    return [*rows, ("status", "complete"), file], True


def _readable_run_rows(run: Run) -> list[tuple[str, str]]:
    from . import schema  # as in _call: not at the top

    run.check()
    attrs = run.attrs
    call = _call(run)
    prompt = int((run.forward_index == 0).sum())
    decoding = call not in ("prefill", "?", *schema.PREFILL_CALLS) and prompt < run.num_tokens  # a decoder by name
    if call == "generate" or decoding:
        call += f" ({prompt} prompt + {run.num_tokens - prompt} generated tokens)"
    rows = [("call", call), ("tokens", str(run.num_tokens)), ("steps (min-max)", steps_text(run))]
    if run.loops:
        rows.append(("states", f"{run.logical_dtype()}, hidden size {run.hidden_size()}"))
    signals = [name for loop in run.loops for name in run.signal_names(loop)]
    if signals:
        rows.append(("signals", ", ".join(signals)))
    arguments = schema.text_or(attrs.get("call_arguments"), "")  # the call's settings (hooks/call_arguments.py)
    if arguments not in ("", "{}"):
        rows.append(("call arguments", _cut(arguments)))
    if "source_file" in attrs:
        rows.append(("merged from", f"{attrs['source_file']}, run {attrs.get('source_run', '?')}"))
    tokens = run.tokens
    if tokens is not None:
        shown = "".join(VISIBLE.get(c, c) for c in "".join(tokens[:MAX_TEXT]))
    else:
        shown = " ".join(str(i) for i in run.token_ids[:MAX_TEXT].tolist())
    rows.append(("text" if tokens is not None else "token ids", _cut(shown)))
    return rows


def _call(run: Run) -> str:
    """How the run was made: a prefill (one forward), a generate() call, or the adapter's named method."""
    from . import schema  # here, not at the top: ``import loopscope`` loads this module and must not load h5py

    call = schema.text_or(run.attrs.get("call"), "?")  # a damaged attribute (an array, a number) shows as "?"
    return "prefill" if call == "forward" else call


def steps_text(run: Run) -> str:
    """Iterations per token, min-max, per loop (loops named when there are several), and a step stride if any: the
    same cell in Jupyter's runs table and ``loopscope info``'s."""
    spans = []
    for loop in run.loops:
        steps = run.iterations_of(loop)
        span = f"{steps.min()}-{steps.max()}" if steps.size else "-"
        spans.append(f"{loop} {span}" if len(run.loops) > 1 else span)
    text = ", ".join(spans) or "-"
    if run.loops and run.step_stride > 1:
        text += f" (1 in {run.step_stride} kept)"
    return text


# ---- HTML -------------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    """A value from a file as inert HTML text (control characters shown as escapes)."""
    import html

    from .safety import clean

    return html.escape(clean(value))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _first_line(exc: BaseException, path: str | None = None) -> str:
    """An error's first line, cut short; a run file's path (the row or header already says where) as its name."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    return _cut(line.replace(path, os.path.basename(path)) if path else line)


def _note(what: str, exc: BaseException) -> str:
    return f'<p style="{STYLE}"><em>{_e(what)}: {_e(_first_line(exc))}</em></p>'


def _table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(
        f'<tr><th style="text-align: left">{_e(label)}</th><td style="text-align: left">{_e(value)}</td></tr>'
        for label, value in rows
    )
    return f'<table style="{STYLE}">{body}</table>'


def _grid(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(name)}</th>" for name in columns)
    body = "".join("<tr>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table style="{STYLE}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def files_size(*paths: str | os.PathLike) -> str:
    """The files' size on disk together (a capture: its index and run files), readable; "size unknown" when one
    was renamed or removed meanwhile (a capture still running)."""
    try:
        return human_bytes(float(sum(os.path.getsize(path) for path in paths)))
    except OSError:
        return "size unknown"


def human_bytes(size: float) -> str:
    """Bytes in the largest binary unit that keeps the number readable."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""
