"""The ``loopscope`` command: thin wrappers that parse, call storage/analysis, and print.

Every expected failure is a :class:`LoopscopeError` and becomes one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from ..storage.errors import LoopscopeError

app = typer.Typer(
    help="Record and inspect every iteration of looped-depth language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)


def _friendly(fn):
    """Turn LoopscopeError (and a missing file) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoopscopeError as exc:
            errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("loopscope-demo"), "--out", help="Directory for demo.h5 and convergence.png."),
    steps: int = typer.Option(64, "--steps", help="Iterations of the recurrent block per token."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", help="Tokens to generate after the prompt."),
):
    """Build the reference looped model offline, capture a prompt, and draw its convergence heatmap."""
    from ..examples.demo import run_demo

    with console.status("capturing the demo model…"):
        result = run_demo(out, steps=steps, max_new_tokens=max_new_tokens)
    console.print(f"wrote [bold]{result.capture}[/bold] ({result.tokens} tokens x {steps} iterations)")
    console.print(f"wrote [bold]{result.figure}[/bold]")


@app.command()
@_friendly
def info(file: Path = typer.Argument(..., help="A capture file (.h5).")):
    """Summarise a capture: model, loops, and one row per run."""
    from ..storage.reader import CaptureFile

    with CaptureFile(file) as capture:
        meta = capture.meta
        console.print(f"[bold]{file}[/bold]  format v{meta.get('format_version')}  {_size(file)}")
        loop = meta.get("loop_json", {})
        console.print(f"model   {meta.get('model_class', '?')} {meta.get('name_or_path', '')}".rstrip())
        console.print(f"loop    {loop.get('family', '?')}: {', '.join(s['exit'] for s in loop.get('loops', []))}")
        console.print(f"created {meta.get('created', '?')} with loopscope {meta.get('loopscope_version', '?')}")
        table = Table("run", "call", "tokens", "steps (min-max)", "loops", "dtype", "hidden")
        for run in capture.runs:
            steps = run.num_steps if run.loops else None
            span = f"{steps.min()}-{steps.max()}" if steps is not None and steps.size else "-"
            table.add_row(
                str(run.index),
                str(run.attrs.get("call", "")),
                str(run.num_tokens),
                span,
                ",".join(run.loops),
                run.logical_dtype() if run.loops else "-",
                str(run.hidden_size()) if run.loops else "-",
            )
        console.print(table)
        if capture.incomplete_runs:
            console.print(f"[yellow]{len(capture.incomplete_runs)} incomplete run(s) skipped[/yellow]")


@app.command()
@_friendly
def plot(
    file: Path = typer.Argument(..., help="A capture file (.h5)."),
    run: int = typer.Option(0, "--run", help="Run index (see `loopscope info`)."),
    out: Path = typer.Option(Path("convergence.png"), "--out", help="Output figure (.png, .pdf or .svg)."),
    space: str = typer.Option(
        "auto", "--space", help="readout (final norm applied, as in the paper), state, or auto (readout if stored)."
    ),
    loop: Optional[str] = typer.Option(None, "--loop", help="Which loop, for models with several."),
):
    """Draw the convergence heatmap of one run."""
    from ..storage.reader import CaptureFile
    from ..analysis.figures import heatmap
    from ..analysis.convergence import convergence, resolve_space

    _check_figure_path(out)
    with CaptureFile(file) as capture:
        chosen = capture.run(run)
        distances = convergence(chosen, space=space, loop=loop)
        space = resolve_space(chosen, space)
        heatmap(
            distances,
            out,
            tokens=chosen.tokens,
            positions=chosen.positions,
            space=space,
            title=f"{Path(file).name}, run {chosen.index}",
        )
    console.print(f"wrote [bold]{out}[/bold]")


def _check_figure_path(out: Path) -> None:
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise LoopscopeError(f"--out {out}: use a .png, .pdf or .svg file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LoopscopeError(f"--out {out}: directory {parent} does not exist; create it first")


def _size(path: Path) -> str:
    """Size of the index plus its run files."""
    from ..storage.capture_file import list_run_files

    size = float(os.path.getsize(path) + sum(os.path.getsize(p) for p, _ in list_run_files(str(path)).values()))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def main() -> None:
    app()
