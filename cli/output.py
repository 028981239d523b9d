"""What every command prints with: the consoles, safe text, the error wrapper, progress bars and small formatters.

Kept apart from the commands so that plots and measures print exactly as the commands do, on the same consoles.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

from ..analysis.figure_axes import nonfinite_note
from ..errors import LoopscopeError
from ..storage.display import files_size
from ..storage.run_files import list_run_files
from ..storage.safety import clean

MISSING_HELP = "Run files the index links but the folder lacks: error, or skip them and read the rest."

console = Console(soft_wrap=True, emoji=False)  # paths are printed whole, never wrapped
errors = Console(stderr=True, soft_wrap=True, emoji=False)


def text(value) -> str:
    """A string from a file, a path or the command line, printed as itself: never rich markup, never a terminal
    control sequence (an ESC stored in a model name must not reach the terminal)."""
    return escape(clean(value))


def first_few(items, limit: int) -> str:
    """``items`` joined by commas, at most ``limit`` of them and a count of the rest."""
    items = [str(item) for item in items]
    rest = len(items) - limit
    return ", ".join(items[:limit]) + (f" (and {rest} more)" if rest > 0 else "")


def note_first_loop(run, doing: str) -> None:
    """A run of several loops (HRM-Text's H and L) is drawn or measured in its first unless --loop says otherwise:
    say so, on stderr, so the output is never taken for the other loop's."""
    errors.print(
        f"note: run {run.index} has loops {', '.join(text(n) for n in run.loops)}; {doing} {text(run.loops[0])} "
        "(pick another with --loop NAME)",
        highlight=False,
    )


def friendly(fn):
    """Turn LoopscopeError (and a missing file) into one line on stderr and exit code 1; warnings into one line each."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    return fn(*args, **kwargs)
                finally:
                    for warning in caught:  # one line each, not Python's two naming loopscope's own source line
                        said = str(warning.message).removeprefix("loopscope: ")
                        errors.print(f"[yellow]warning:[/yellow] {text(for_cli(said))}", highlight=False)
        except LoopscopeError as exc:
            errors.print(f"[red]error:[/red] {text(for_cli(str(exc)))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


# The library's messages name its Python keywords (mode='w'); on the command line they name the flag instead, or
# say what a user of the command can do where no flag exists. Most specific first.
CLI_WORDING = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (
            r"open with missing='skip' \(loopscope\.open\(path, missing='skip'\), --missing skip\)",
            "pass --missing skip",
        ),
        (r" \(force=True\)", ""),
        (
            r"(?:try|pass) locking=False",
            "write the capture to a local disk (the command line keeps HDF5 file locking on)",
        ),
        (
            r"pass loop='dotted\.module\.path'",
            "attach from Python with loopscope.attach(model, path, loop='dotted.module.path')",
        ),
        (r"pass dtype='float32' to attach\(\) to store one dtype", "pass --dtype float32 to run in one dtype"),
        (r"trust_remote_code=True", "--trust-remote-code"),
        (r"\b(mode|missing|space|kind|tokens|reference|other)='([^']*)'", r"--\1 \2"),
        (r"\bstep_stride=(-?\d+)", r"--step-stride \1"),
        (r"\btop_k=(-?\d+)", r"--top-k \1"),
        (r"\btokens= ", "--tokens "),
    )
)


def for_cli(message: str) -> str:
    """``message`` with the library's keyword arguments replaced by the command line's flags (see CLI_WORDING)."""
    for pattern, replacement in CLI_WORDING:
        message = pattern.sub(replacement, message)
    return message


@contextlib.contextmanager
def progress(description: str, total: int):
    """A transient rich progress bar on stderr, so stdout keeps only results; yields ``advance(n)``. Off where
    stderr is no terminal: there rich draws nothing but ends with a blank line, noise in a log."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=errors, transient=True, disable=not errors.is_interactive) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def warn_nonfinite(metrics) -> None:
    """Say which tokens blew up: their blanks in figures and empty CSV cells would otherwise go unexplained."""
    note = nonfinite_note(metrics)
    if note is not None:
        errors.print(f"[yellow]warning:[/yellow] {text(note)}", highlight=False)


def run_title(run) -> str:
    """'FILE run N (D steps)': names a run in figure titles and legends, where several runs may meet."""
    steps = run.iterations_of(None) if run.loops else np.array([])
    depth = f"{int(steps.max())} steps" if steps.size else "no steps"
    if run.loops and run.step_stride > 1:
        depth += f", 1 in {run.step_stride} stored"
    return f"{Path(run.capture.path).name} run {run.index} ({depth})"


def describe_loop(loop) -> str:
    """'family: exit module, ...' from the stored adapter JSON; '?' where it is missing or damaged."""
    if not isinstance(loop, dict):
        return "? (no readable loop description)"
    listed = loop.get("loops")
    loops = listed if isinstance(listed, list) else []
    exits = [str(spec.get("exit", "?")) for spec in loops if isinstance(spec, dict)]
    return f"{loop.get('family', '?')}: {', '.join(exits) or '?'}"


def capture_size(path: Path) -> str:
    """Size of the index plus its run files: the index alone holds almost none of a capture's bytes."""
    return files_size(path, *(p for p, _ in list_run_files(str(path)).values()))
