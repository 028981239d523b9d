"""``write_report``: a capture's runs (and with a model, its lens) into one self-contained HTML report."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..analysis.figure_axes import checked_output, refuse_capture_files
from ..analysis.reference import resolve_space
from ..errors import CaptureFileError, LoopscopeError
from ..storage import outputs, schema
from ..storage.reader import CaptureFile
from . import data, page

SUFFIXES = (".html", ".htm")
TOP_K = 3  # lens predictions per step in the token panel
MAX_TOP_K = 50  # more is no table to read, and the page grows with it (100000 made a 40 MB page)


def write_report(
    capture: CaptureFile,
    out: str | os.PathLike,
    *,
    runs: list[int] | None = None,
    space: str = "auto",
    model=None,
    tokenizer=None,
    top_k: int = TOP_K,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write the report of ``capture`` (``runs``: indices, default all) to ``out``; returns the path written.

    ``space``: where distances and trajectories are taken: ``"readout"`` (the stored final norm, as the paper),
    ``"state"`` (the raw latent), or ``"auto"`` (readout where the capture stored a norm).

    ``model``: the captured model's local directory (only the head's weights are read) or the loaded model; each
    token panel then shows the logit lens's top-``top_k`` predictions per step, as text with ``tokenizer`` (by
    default the directory's). The file appears whole or not at all.
    """
    out = check_out(out)
    refuse_capture_files(capture, [out])  # before any work: the page must not replace the data it shows
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise LoopscopeError(
            f"top_k={top_k!r}: give 1 to {MAX_TOP_K}, the predictions the page shows per step (e.g. {TOP_K}); "
            "for more, write the lens table (loopscope lens --out lens.csv --top-k N)"
        )
    chosen = capture.select(runs) if runs else capture.runs  # each once: a run given twice is refused
    if not chosen:
        raise LoopscopeError(f"{capture.path} holds no complete runs to report; capture some first")
    resolve_space(chosen[0], space)  # a bad space, or readout where no norm was stored: one line before any work
    if model is not None:
        model, tokenizer = lens_source(model, tokenizer, trust_remote_code, chosen[0])
    views, notes = [], _notes(capture, chosen)
    heads: dict[str, object] = {}  # each loop's readout, built once for every run (a checkpoint's head read once)
    for run in chosen:
        try:
            if run.num_tokens == 0:  # nothing to draw (a hand-trimmed or foreign file): say so beside the others
                raise CaptureFileError(f"run {run.index} holds no tokens")
            if not run.loops:  # called with num_steps=0: no state was recorded
                raise CaptureFileError(f"run {run.index} ran no loop iterations, so there are no states to show")
            run_views = data.run_views(run, progress, space)
        except CaptureFileError as exc:  # a damaged run file: the others are still worth a look
            if len(chosen) == 1:
                raise
            notes.append(f"run {run.index} left out: {exc}")
            continue
        if model is not None:
            add_lens(run, run_views, model, tokenizer, top_k, progress, heads)
        views += run_views
    if not views:
        raise LoopscopeError(f"no run of {capture.path} could be read: {'; '.join(notes)}")
    html = page.render(
        [data.packed(view) for view in views],
        title=f"{Path(capture.path).name}: convergence of the latent state",
        source=f"{Path(capture.path).name} · {schema.as_text(capture.meta.get('model_class')) or 'model'} · "
        f"{len(chosen)} run(s) · s* = each token's final state",
        notes=notes,
    )
    outputs.write_whole(out, lambda partial: Path(partial).write_text(html, encoding="utf-8"))
    return out


def lens_source(model, tokenizer, trust_remote_code: bool, run) -> tuple:
    """(model, tokenizer) to read the lens through, settled once per report: a checkpoint directory checked against
    the capture, with its own tokenizer unless one was given; a loaded model as it is."""
    from ..analysis.readout_lens import check_directory, tokenizer_of

    if isinstance(model, (str, os.PathLike)):
        directory = Path(model)
        check_directory(directory, run)
        if tokenizer is None:
            tokenizer = tokenizer_of(directory, trust_remote_code)
        model = os.fspath(directory)
    return model, tokenizer


def add_lens(run, views: list[data.RunView], model, tokenizer, top_k: int, progress, heads: dict) -> None:
    """The logit lens of each view, through the loop's readout in ``heads`` (built on first use); a loop with no
    readout (HRM-Text's L) gets a note, a model that reads none of the run's loops is an error."""
    from ..analysis.readout_lens import logit_lens, readout_for

    failures = []
    for view in views:
        if progress is not None:
            progress(f"lens of run {view.run}, loop {view.loop}")
        try:
            if view.loop not in heads:
                heads[view.loop] = readout_for(run, model, view.loop)
            result = logit_lens(run, view.loop, heads[view.loop], top_k)
        except LoopscopeError as exc:
            failures.append(exc)
            view.notes.append(f"run {view.run}, loop {view.loop}: no lens predictions ({exc})")
            continue
        view.lens = data.lens_view(result, tokenizer)
    if failures and len(failures) == len(views):
        raise failures[0]


def check_out(out: str | os.PathLike) -> Path:
    """An .html path in an existing directory, or a one-line error saying what to do."""
    return checked_output(out, SUFFIXES, "name the report .html")


def _notes(capture: CaptureFile, runs: list) -> list[str]:
    notes = []
    if capture.incomplete_runs:
        notes.append(f"left out, not complete: {', '.join(capture.incomplete_runs)}")
    if any(run.step_stride > 1 for run in runs):
        notes.append("steps were stored with a stride: hover a cell for the iteration it holds")
    return notes
