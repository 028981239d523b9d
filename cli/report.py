"""``loopscope report``: a capture as one self-contained HTML page to explore in a browser (``report/``)."""

from __future__ import annotations

from pathlib import Path

import typer

from .lens import check_model_dir
from .output import MISSING_HELP, console, friendly, text


@friendly
def report(
    file: Path = typer.Argument(..., help="A capture file (.h5), merged ones included.", readable=False),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="The captured model's local directory: adds each token's lens predictions per step.",
        readable=False,
    ),
    run: list[int] | None = typer.Option(
        None,
        "--run",
        help="Run index to include, repeatable (see `loopscope info`; negative counts from the last run, -1 the last); "
        "default every run.",
    ),
    space: str = typer.Option(
        "auto", "--space", help="readout (final norm applied, as in the paper), state, or auto (readout if stored)."
    ),
    top_k: int = typer.Option(3, "--top-k", help="With --model: predictions shown per token and step."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own tokenizer code."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Write an interactive HTML report: heatmaps with hover, a run selector, and a panel for each clicked token."""
    from ..report.build import check_out, write_report
    from ..storage.reader import CaptureFile

    check_out(out)
    if model is not None:
        check_model_dir(model)
    with CaptureFile(file, missing=missing) as capture, console.status("computing the report…") as status:
        if run:
            capture.select(run, "--run")  # a run given twice: said as the command line gave it
        written = write_report(
            capture,
            out,
            runs=run,
            space=space,
            model=model,
            top_k=top_k,
            trust_remote_code=trust_remote_code,
            progress=lambda what: status.update(f"computing the report: {what}…"),
        )
    size = written.stat().st_size / 1e6
    console.print(f"wrote [bold]{text(written)}[/bold] ({size:.1f} MB; open it in a browser, no network needed)")
