"""The ``loopscope`` command: thin wrappers that parse, call storage/analysis, and print.

Every expected failure is a :class:`LoopscopeError` and becomes one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..analysis.metrics import CONVERGENCE_METRIC, DEFAULT_TOL, METRIC_HELP, METRICS
from ..errors import LoopscopeError
from ..storage.safety import clean

app = typer.Typer(
    help="Record and inspect every iteration of looped-depth language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(soft_wrap=True, emoji=False)  # paths are printed whole, never wrapped
errors = Console(stderr=True, soft_wrap=True, emoji=False)
MISSING_HELP = "Run files the index links but the folder lacks: error, or skip them and read the rest."


def _text(value) -> str:
    """A string from a file, a path or the command line, printed as itself: never rich markup, never a terminal
    control sequence (an ESC stored in a model name must not reach the terminal)."""
    return escape(clean(value))


def _friendly(fn):
    """Turn LoopscopeError (and a missing file) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoopscopeError as exc:
            errors.print(f"[red]error:[/red] {_text(exc)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@_friendly
def demo(
    out: Path = typer.Option(Path("loopscope-demo"), "--out", help="Directory for demo.h5 and convergence.png."),
    steps: int = typer.Option(64, "--steps", help="Iterations of the recurrent block per token."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", help="Tokens to generate after the prompt."),
):
    """Capture the shipped demo model (a small trained looped LM) on a prompt and draw its convergence heatmap."""
    from transformers.utils import logging as hf_logging

    from ..models.demo import run_demo

    hf_logging.disable_progress_bar()  # the status line below says what is happening
    with console.status("capturing the demo model…"):
        result = run_demo(out, steps=steps, max_new_tokens=max_new_tokens)
    console.print(f"wrote [bold]{_text(result.capture)}[/bold] ({result.tokens} tokens x {steps} iterations)")
    console.print(f"wrote [bold]{_text(result.figure)}[/bold]")


@app.command()
@_friendly
def info(
    file: Path = typer.Argument(..., help="A capture file (.h5)."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Summarise a capture: model, loops, and one row per run."""
    from ..storage.run_files import unexpected_files
    from ..storage.reader import CaptureFile

    with CaptureFile(file, missing=missing) as capture:
        meta = capture.meta
        console.print(f"[bold]{_text(file)}[/bold]  format v{_text(meta.get('format_version'))}  {_size(file)}")
        model = f"{meta.get('model_class', '?')} {meta.get('name_or_path', '')}".rstrip()
        console.print(f"model   {_text(model)}")
        console.print(f"loop    {_text(_describe_loop(meta.get('loop_json')))}")
        console.print(f"created {_text(meta.get('created', '?'))} with loopscope {_text(meta.get('loopscope_version', '?'))}")
        table = Table("run", "call", "tokens", "steps (min-max)", "loops", "dtype", "hidden", "signals")
        damaged = 0
        for run in capture.runs:
            try:
                spans = []
                for loop in run.loops:  # HRM's H and L, ALBERT's groups: each loop its own range
                    steps = run.iterations_of(loop)
                    spans.append((f"{loop} " if len(run.loops) > 1 else "") + (
                        f"{steps.min()}-{steps.max()}" if steps.size else "-"))
                span = ", ".join(spans) or "-"
                if run.loops and run.step_stride > 1:
                    span += f" (1 in {run.step_stride} kept)"
                row = tuple(_text(cell) for cell in (
                    str(run.attrs.get("call", "")),
                    str(run.num_tokens),
                    span,
                    ",".join(run.loops),
                    run.logical_dtype() if run.loops else "-",
                    str(run.hidden_size()) if run.loops else "-",
                    ",".join(n for loop in run.loops for n in run.signal_names(loop)) or "-",
                ))
            except LoopscopeError:  # one damaged run file must not hide the others
                damaged += 1
                row = ("[red]damaged[/red]", "-", "-", "-", "-", "-", "-")
            table.add_row(str(run.index), *row)
        console.print(table)
        if damaged:
            console.print(f"[yellow]{damaged} damaged run file(s): `loopscope plot --run N` says what is wrong[/yellow]")
        if capture.incomplete_runs:
            console.print(f"[yellow]{len(capture.incomplete_runs)} incomplete run(s) skipped[/yellow]")
        strays = unexpected_files(capture.path)
        if strays:
            names = ", ".join(strays[:5]) + (f" (and {len(strays) - 5} more)" if len(strays) > 5 else "")
            console.print(f"[yellow]ignored in the run folder (not run files): {_text(names)}[/yellow]")


@app.command()
@_friendly
def capture(
    model: str = typer.Argument(..., help="A local model directory or a hub id (loaded with AutoModelForCausalLM)."),
    out: Path = typer.Option(..., "--out", help="Capture file to write (.h5)."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Prompt text (one run)."),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="One prompt per line (one run each)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Iterations per token (num_steps); default: the model's."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="Tokens to generate; 0 records one forward."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (Huginn)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    mode: str = typer.Option("w-", "--mode", help="w- refuses an existing file, w overwrites, a appends runs."),
    seed: int = typer.Option(0, "--seed", help="torch seed set before each prompt (Huginn draws s0 at random)."),
    tokens: str = typer.Option("all", "--tokens", help="Tokens to store: all, prompt or generated."),
    step_stride: int = typer.Option(1, "--step-stride", help="Store s0, every N-th iteration and each token's last."),
    criterion: Optional[str] = typer.Option(
        None, "--criterion", help="Huginn adaptive exit: kl, entropy-diff, latent-diff, cosine, argmax-stability."
    ),
    exit_threshold: Optional[float] = typer.Option(None, "--exit-threshold", help="Threshold for --criterion."),
):
    """Load a model, run the prompts through it with loopscope attached, and write the capture."""
    from transformers.utils import logging as hf_logging

    from ..hooks.pretrained import capture_prompts, check_counts, load_pretrained, read_prompts

    from ..storage.index import check_target

    prompts = read_prompts(prompt, prompt_file)
    check_counts(steps, max_new_tokens)
    check_target(out, mode)  # before the model load, which can take minutes
    hf_logging.disable_progress_bar()  # our own status line says what is loading
    with console.status(f"loading {_text(model)}…"):
        loaded, tokenizer = load_pretrained(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    with _progress("capturing prompts", len(prompts)) as advance:
        summary = capture_prompts(
            loaded, tokenizer, prompts, out, steps=steps, max_new_tokens=max_new_tokens, mode=mode, seed=seed,
            on_prompt=lambda i: advance(1), criterion=criterion, exit_threshold=exit_threshold,
            tokens=tokens, step_stride=step_stride,
        )
    console.print(
        f"wrote [bold]{summary.path}[/bold]: {summary.prompts} prompt(s), {summary.tokens} tokens, on {summary.device}"
    )


@app.command()
@_friendly
def plot(
    file: Path = typer.Argument(..., help="A capture file (.h5)."),
    kind: str = typer.Option("heatmap", "--kind", help="heatmap, pca, curves, exits, compare or signal."),
    run: List[int] = typer.Option([0], "--run", help="Run index (see `loopscope info`); repeat for curves."),
    reference: str = typer.Option(
        "final", "--reference", help="s*: final (each token's last state), a run index, or FILE[:RUN]."
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Figure file (.png, .pdf or .svg); default KIND.png."),
    space: str = typer.Option(
        "auto", "--space", help="readout (final norm applied, as in the paper), state, or auto (readout if stored)."
    ),
    loop: Optional[str] = typer.Option(None, "--loop", help="Which loop, for models with several."),
    zeros: str = typer.Option("clip", "--zeros", help="heatmap: show s* itself (distance 0) at the floor (clip) or blank (drop)."),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="pca: token indices, e.g. 3,7,12 (default: fastest, median and slowest to converge)."),
    basis: str = typer.Option("token", "--basis", help="pca: components per token, or shared by the tokens shown."),
    metric: str = typer.Option("distance", "--metric", help="curves: " + ", ".join(METRICS) + "."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="exits/pca: relative distance that counts as converged."),
    other: Optional[str] = typer.Option(None, "--other", help="compare: the second run, as a run index or FILE[:RUN]."),
    signal: Optional[str] = typer.Option(None, "--signal", help="signal: which one (see `loopscope info`), e.g. exit_gate."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Draw a figure of one run (or several, for curves): heatmap, PCA trajectories, curves, exits, compare."""
    from ..analysis import figures
    from ..analysis.pca import trajectory_pca
    from ..analysis.reference import open_reference_run, parse_reference
    from ..storage.reader import CaptureFile

    if kind not in PLOT_KINDS:
        raise LoopscopeError(f"--kind {kind}: use one of {', '.join(PLOT_KINDS)}")
    out = figures.check_figure_path(out if out is not None else Path(f"{kind}.png"))
    if len(run) > 1 and kind != "curves":
        raise LoopscopeError(f"--kind {kind} draws one run; repeat --run only for curves")
    ref = parse_reference(reference)
    with CaptureFile(file, missing=missing) as capture, contextlib.ExitStack() as stack:
        chosen = [capture.run(i) for i in run]
        first = chosen[0]
        name = Path(file).name
        if kind == "heatmap":
            m = _metrics(first, ref, space, loop, ("distance",))
            written = figures.heatmap(
                m.distance, out, tokens=first.tokens, positions=first.positions, reference=m.reference,
                space=m.space, zeros=zeros, title=f"{name}, run {first.index}: convergence of the latent state",
                step_stride=first.step_stride,
            )
        elif kind == "compare":
            if other is None:
                raise LoopscopeError("--kind compare needs --other: a run index or FILE[:RUN]")
            second = open_reference_run(first, parse_reference(other), stack)
            a, b = (_metrics(r, ref, space, loop, ("distance",)) for r in (first, second))
            written = figures.compare(
                a.distance, b.distance, out, tokens=first.tokens, reference=a.reference, space=a.space, zeros=zeros,
                titles=(_run_title(first), _run_title(second)), step_strides=(first.step_stride, second.step_stride),
            )
        elif kind == "curves":
            if metric not in METRICS:
                raise LoopscopeError(f"--metric {metric}: use one of {', '.join(METRICS)}")
            strides = sorted({r.step_stride for r in chosen})
            if len(strides) > 1:
                raise LoopscopeError(f"--kind curves: these runs were stored with step strides {strides}, which "
                                     "share no x axis; draw each stride separately")
            series = [(_run_title(r), _metrics(r, ref, space, loop, (metric,))[metric]) for r in chosen]
            written = figures.curves(
                series, out, ylabel=METRIC_HELP[metric], log=metric not in ("cosine", "norm"),
                title=f"{name}: {METRIC_HELP[metric]} per iteration, s* = {reference}", step_stride=strides[0],
            )
        elif kind == "signal":
            names = first.signal_names(loop)
            if signal is None and len(names) != 1:
                raise LoopscopeError(f"--kind signal needs --signal NAME; run {first.index} has {names or 'no signals'}")
            chosen_signal = signal or names[0]
            written = figures.signal_heatmap(
                first.signal(chosen_signal, loop), out, name=chosen_signal, tokens=first.tokens,
                positions=first.positions, title=f"{_run_title(first)}: {chosen_signal} per token and step",
                step_stride=first.step_stride,
            )
        elif kind == "exits":
            steps = first.iterations_of(loop)
            if np.unique(steps).size > 1:
                written = figures.exits(steps, out, title=f"{_run_title(first)}: steps to exit (adaptive depth)")
            else:
                converged = _metrics(first, ref, space, loop, (CONVERGENCE_METRIC,)).convergence_iterations(tol)
                written = figures.exits(
                    converged, out, xlabel=f"First step with ||s - s*|| / ||s*|| <= {tol:g} from then on",
                    title=f"{_run_title(first)}: fixed depth {int(steps.max()) if steps.size else 0}, convergence step per token",
                )
        else:
            selected = _parse_tokens(tokens) if tokens else _typical_tokens(
                _metrics(first, ref, space, loop, (CONVERGENCE_METRIC,)), tol
            )
            trajectories = trajectory_pca(first, selected, space=space, loop=loop, basis=basis)
            written = figures.pca_trajectories(
                trajectories, out, title=f"{_run_title(first)}: latent trajectories, principal components"
            )
    for path in written:
        console.print(f"wrote [bold]{_text(path)}[/bold]")


@app.command("convergence")
@_friendly
def convergence_table(
    file: Path = typer.Argument(..., help="A capture file (.h5)."),
    out: Path = typer.Option(..., "--out", help="CSV to write: one row per run, token and step."),
    run: Optional[List[int]] = typer.Option(None, "--run", help="Run index; repeat for several (default: all)."),
    reference: str = typer.Option("final", "--reference", help="s*: final, a run index, or FILE[:RUN]."),
    space: str = typer.Option("auto", "--space", help="readout, state, or auto (readout if stored)."),
    loop: Optional[str] = typer.Option(None, "--loop", help="Which loop, for models with several."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Relative distance that counts as converged."),
    scheduler: Optional[str] = typer.Option(
        None, "--scheduler", help="Compute with Dask: threads, processes, or a cluster's address tcp://HOST:PORT (loopscope[scale])."
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Dask on this machine with N threads."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Every measure per token and step (distance, relative distance, step delta, cosine, norm) as CSV."""
    from ..analysis.reference import parse_reference
    from ..storage.reader import CaptureFile

    if out.suffix.lower() != ".csv":
        raise LoopscopeError(f"--out {out}: use a .csv file name")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise LoopscopeError(f"--out {out}: directory {parent} does not exist; create it first")
    table = Table("run", "tokens", "steps", "converged at (median)", "never converged", "last step delta (mean)")
    rows = 0
    partial = out.with_name(out.name + ".partial")  # renamed once every run is in: a failure leaves no half table
    with CaptureFile(file, missing=missing) as capture, _removed_on_error(partial):
        chosen = _selected_runs(capture, run)
        if not chosen:
            raise LoopscopeError(f"{file} has no complete runs")
        on_dask = scheduler is not None or workers is not None
        computed = _dask_metrics(file, run, reference, space, loop, scheduler, workers) if on_dask else None
        for i, r in enumerate(chosen):
            m = computed[i] if computed else _metrics(r, parse_reference(reference), space, loop)
            rows += m.to_csv(partial, tol=tol, append=i > 0)
            converged = m.convergence_steps(tol)
            done = converged[converged >= 0]
            last = m.step_delta[np.arange(len(m.num_steps)), m.num_steps] if len(m.num_steps) else np.array([])
            last = last[np.isfinite(last)]
            table.add_row(
                str(r.index), str(r.num_tokens), f"{m.num_steps.min()}-{m.num_steps.max()}" if r.num_tokens else "-",
                f"{np.median(done):g}" if done.size else "-", str(int(np.sum(converged < 0))),
                f"{last.mean():.3g}" if last.size else "-",
            )
        os.replace(partial, out)
    console.print(table)
    console.print(f"wrote [bold]{_text(out)}[/bold] ({rows} rows, s* = {_text(reference)}, tolerance {tol:g})")


@app.command()
@_friendly
def merge(
    out: Path = typer.Argument(..., help="The merged capture to write (.h5)."),
    sources: List[Path] = typer.Argument(..., help="Captures to join, e.g. cap.rank*.h5 from a torchrun job."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Join captures into one whose states are HDF5 virtual datasets over theirs: nothing is copied."""
    from ..storage.merge import merge as merge_captures

    summary = merge_captures(out, sources, force=force)
    console.print(
        f"wrote [bold]{_text(summary.path)}[/bold]: {summary.runs} run(s) from {summary.sources} file(s), "
        f"{_human_bytes(summary.state_bytes)} of states mapped, {_human_bytes(summary.file_bytes)} written"
    )
    if summary.skipped_incomplete:
        console.print(f"[yellow]{summary.skipped_incomplete} incomplete run(s) of the sources left out[/yellow]")
    for path in summary.empty_sources:
        console.print(f"[yellow]{_text(path)} has no complete runs[/yellow]")


@app.command()
@_friendly
def export(
    file: Path = typer.Argument(..., help="A capture file (.h5)."),
    format: str = typer.Option(..., "--format", help="npz or safetensors."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output file (default: FILE with the format's suffix)."),
    run: Optional[List[int]] = typer.Option(None, "--run", help="Run index; repeat for several (default: all)."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Write the states and token data to .npz or .safetensors, streamed (bf16 stays bf16 in safetensors)."""
    from ..storage.export import FORMATS, export as export_capture
    from ..storage.reader import CaptureFile

    if format not in FORMATS:
        raise LoopscopeError(f"--format {format}: use one of {', '.join(FORMATS)}")
    out = out if out is not None else Path(file).with_suffix("." + format)
    with CaptureFile(file, missing=missing) as capture:
        chosen = _selected_runs(capture, run)
        total = sum(r.dataset(loop).size * r.dataset(loop).dtype.itemsize for r in chosen for loop in r.loops)
        with _progress(f"exporting to {_text(out.name)}", max(total, 1)) as advance:
            names = export_capture(capture, out, format, runs=[r.index for r in chosen], progress=advance)
    console.print(f"wrote [bold]{_text(out)}[/bold] ({len(names)} arrays from {len(chosen)} run(s))")


@app.command()
@_friendly
def verify(file: Path = typer.Argument(..., help="A capture file (.h5).")):
    """Check every stored chunk against its checksum; list damaged chunks (exit code 1 when there are any)."""
    from rich.text import Text

    from ..storage.verify import describe, verify_capture

    with console.status("checking chunks…"):
        result = verify_capture(file)
    findings = [(f, "damaged") for f in result.damaged] + [(f, "unchecked") for f in result.unchecked]
    if findings:
        table = Table("run", "dataset", "where", "problem")
        for f, kind in findings:
            run = Text("index" if f.run is None else str(f.run))
            problem = Text(f.problem, style="red" if kind == "damaged" else "yellow")
            table.add_row(run, Text(f.dataset or Path(f.file).name), Text(f.where or "-"), problem)
        console.print(table)
    console.print(Text(describe(result)))
    if result.incomplete:
        console.print(Text(f"{len(result.incomplete)} incomplete run file(s) checked too", style="yellow"))
    if result.unchecked:
        console.print(Text(f"warning: {len(result.unchecked)} dataset(s) not checksummed (written before "
                           "checksums); their bytes cannot be checked", style="yellow"))
    if not result.ok:
        errors.print(Text(f"error: {len(result.damaged)} damaged chunk(s) or file(s) in {file}", style="red"))
        raise typer.Exit(1)
    console.print(Text(f"ok: every checksummed chunk of {file} matches", style="green"))


PLOT_KINDS = ("heatmap", "pca", "curves", "exits", "compare", "signal")


@contextlib.contextmanager
def _removed_on_error(path: Path):
    """Delete ``path`` if the block fails (a file written in part)."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _metrics(run, reference, space, loop, measures=METRICS):
    """The measures of ``run`` a command needs (each costs arithmetic), with a progress bar while the states
    stream in."""
    from ..analysis.metrics import token_metrics

    with _progress(f"run {run.index}: reading states", max(run.num_tokens, 1)) as advance:
        metrics = token_metrics(run, reference, space, loop=loop, progress=advance, measures=measures)
    _warn_nonfinite(metrics)
    return metrics


def _dask_metrics(file, runs, reference, space, loop, scheduler, workers) -> list:
    """Every selected run's measures in one Dask computation (see analysis/distributed.py)."""
    from ..analysis.distributed import token_metrics
    from ..analysis.reference import parse_reference

    with console.status(f"computing on Dask ({scheduler or 'threads'})…"):
        results = token_metrics(
            file, runs=runs, reference=parse_reference(reference), space=space, loop=loop,
            scheduler=scheduler, workers=workers,
        )
    for metrics in results:
        _warn_nonfinite(metrics)
    return results


def _warn_nonfinite(metrics) -> None:
    bad = metrics.nonfinite_tokens()
    if bad.size:
        errors.print(
            f"[yellow]warning:[/yellow] run {metrics.run}: {bad.size} token(s) have NaN or infinite states "
            f"(first: token {int(bad[0])}); they are left blank in figures and empty in CSV",
            highlight=False,
        )


@contextlib.contextmanager
def _progress(description: str, total: int):
    """A transient rich progress bar on stderr; yields ``advance(n)``."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=errors, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _selected_runs(capture, indices: Optional[List[int]]) -> list:
    """The runs named by repeated ``--run`` options, or every complete run when none is given."""
    return [capture.run(i) for i in indices] if indices else capture.runs


def _run_title(run) -> str:
    steps = run.iterations_of(None) if run.loops else np.array([])
    depth = f"{int(steps.max())} steps" if steps.size else "no steps"
    if run.loops and run.step_stride > 1:
        depth += f", 1 in {run.step_stride} stored"
    return f"{Path(run.capture.path).name} run {run.index} ({depth})"


def _parse_tokens(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise LoopscopeError(f"--tokens {text}: give token indices separated by commas, e.g. 3,7,12") from None


def _typical_tokens(m, tol: float) -> list[int]:
    """The fastest, median and slowest token to converge (one that never does is slowest of all), among those
    whose states are finite: three different behaviours to look at."""
    steps = m.convergence_steps(tol).astype(np.float64)
    steps[steps < 0] = np.inf
    finite = np.setdiff1d(np.arange(len(steps)), m.nonfinite_tokens())
    order = finite[np.argsort(steps[finite], kind="stable")]
    picks = [int(order[0]), int(order[len(order) // 2]), int(order[-1])] if len(order) else []
    if not picks:
        raise LoopscopeError("every token has NaN or infinite states (the model blew up); there is nothing to project")
    return list(dict.fromkeys(picks))


def _describe_loop(loop) -> str:
    """'family: exit module, ...' from the stored adapter JSON; '?' where it is missing or damaged."""
    if not isinstance(loop, dict):
        return "? (no readable loop description)"
    loops = loop.get("loops") if isinstance(loop.get("loops"), list) else []
    exits = [str(spec.get("exit", "?")) for spec in loops if isinstance(spec, dict)]
    return f"{loop.get('family', '?')}: {', '.join(exits) or '?'}"


def _size(path: Path) -> str:
    """Size of the index plus its run files."""
    from ..storage.run_files import list_run_files

    try:
        size = float(os.path.getsize(path) + sum(os.path.getsize(p) for p, _ in list_run_files(str(path)).values()))
    except OSError:  # a run file renamed or removed meanwhile (a capture still running)
        return "size unknown"
    return _human_bytes(size)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def main() -> None:
    app()
