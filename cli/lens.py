"""``loopscope lens``: what every stored step of one run would predict, read out through the model's own head.

Everything that can be checked without the model (the kind, the output path, the model directory, the run) is
checked first: loading torch and the weights takes seconds, and a typo should not cost them. The lens itself
(:mod:`..analysis.readout_lens`, torch) is imported only when it runs, so ``loopscope --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from ..analysis.figure_axes import checked_output, refuse_capture_files
from ..analysis.figures import FORMATS, check_figure_path
from ..analysis.lens_result import KINDS
from ..errors import LoopscopeError
from ..storage.outputs import write_whole
from .output import MISSING_HELP, console, friendly, text, warn_nonfinite

WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


@friendly
def lens(
    file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False),
    model: Path = typer.Option(
        ..., "--model", help="The captured model's local directory (config and weights).", readable=False
    ),
    kind: str = typer.Option("logit", "--kind", help="logit (final norm and head) or coda (Huginn's coda first)."),
    run: int = typer.Option(
        0, "--run", help="Run index (see `loopscope info`; negative counts from the last run, -1 the last)."
    ),
    loop: str | None = typer.Option(None, "--loop", help="Which loop, for models with several."),
    top_k: int = typer.Option(
        5, "--top-k", help="Most probable next tokens per token and step: the CSV's topk_ids and topk_probs columns."
    ),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (Huginn)."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
    out: Path = typer.Option(
        ..., "--out", help="A .csv table, or a figure (.png, .pdf, .svg) plus its _kl and _settling siblings."
    ),
):
    """Read every stored step out through the model's head: top-k predictions, entropy, KL to the final step."""
    from ..storage.reader import CaptureFile

    if kind not in KINDS:
        raise LoopscopeError(f"--kind {kind}: use one of {', '.join(KINDS)}")
    if top_k < 1:
        raise LoopscopeError(f"--top-k {top_k}: keep at least 1 token per step")
    table = _check_out(out)
    check_model_dir(model)
    with CaptureFile(file, missing=missing) as capture:
        refuse_capture_files(capture, [out] if table else figure_paths(out))  # before the model loads
        result = _read(capture.run(run), model, kind, loop, top_k, trust_remote_code)
    warn_nonfinite(result)  # their steps predict nothing: blank in figures, empty in the CSV
    if table:
        rows = write_whole(out, result.to_csv)  # renamed once whole: a failure leaves no half table
        console.print(f"wrote [bold]{text(out)}[/bold] ({rows} rows, {kind} lens, run {result.run_index})")
        return
    for path in draw_lens(result, out, f"{Path(file).name}, run {result.run_index}"):
        console.print(f"wrote [bold]{text(path)}[/bold]")


def _read(run, model: Path, kind: str, loop: str | None, top_k: int, trust_remote_code: bool):
    """The lens of ``run``: torch, transformers and the weights load here, once the request is known to be good."""
    from transformers.utils import logging as hf_logging

    from ..analysis.readout_lens import lens as read_lens

    hf_logging.disable_progress_bar()  # the status line below says what is happening
    with console.status(f"reading run {run.index} through the {kind} lens…"):
        return read_lens(run, os.fspath(model), kind, loop=loop, top_k=top_k, trust_remote_code=trust_remote_code)


def figure_paths(out: Path) -> list[Path]:
    """The figures ``lens --out`` writes: the prediction grid, its ``_kl`` and ``_settling`` siblings."""
    return [out, *(out.with_name(f"{out.stem}_{name}{out.suffix}") for name in ("kl", "settling"))]


def draw_lens(result, out: Path, name: str) -> list[str]:
    """The prediction grid at ``out``, the KL heatmap at ``<stem>_kl<suffix>`` and the settling histogram at
    ``<stem>_settling<suffix>``; returns every file written (pages included)."""
    from ..analysis import lens_figures

    kind = result.kind
    grid, kl, settling = figure_paths(out)
    written = lens_figures.prediction_grid(result, grid, title=f"{name}: top-1 prediction per step ({kind} lens)")
    written += lens_figures.kl_heatmap(result, kl, title=f"{name}: KL(p_k || p_final) ({kind} lens)")
    written += lens_figures.settling_histogram(result, settling, title=f"{name}: settling iteration ({kind} lens)")
    return written


def check_model_dir(model: Path) -> None:
    """A model directory holding a config and weights, or one line saying what it lacks."""
    if not model.exists():
        raise LoopscopeError(f"--model {model}: no such directory; pass the captured model's local directory")
    if not model.is_dir():
        raise LoopscopeError(f"--model {model} is not a directory; pass the directory the model was saved to")
    if not (model / "config.json").is_file():
        raise LoopscopeError(f"--model {model} has no config.json; pass a directory saved with save_pretrained")
    if not any(any(model.glob(pattern)) for pattern in WEIGHTS):
        raise LoopscopeError(f"--model {model} has no weights (*.safetensors or *.bin); pass the full model directory")


def _check_out(out: Path) -> bool:
    """True for a CSV table, False for a figure; either way its directory exists."""
    if out.suffix.lower() == ".csv":
        checked_output(out, (".csv",), "use a .csv file name")
        return True
    if out.suffix.lower() not in FORMATS:
        raise LoopscopeError(f"--out {out}: use a .csv, .png, .pdf or .svg file name")
    check_figure_path(out)
    return False
