"""The ``loopscope`` command: thin wrappers that parse, call storage/analysis, and print.

Every expected failure is a :class:`LoopscopeError` and becomes one red line and exit code 1, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..analysis.metrics import DEFAULT_TOL, METRICS
from ..errors import LoopscopeError, MergeError
from ..storage.display import human_bytes
from . import lens as lens_command
from . import plots
from . import report as report_command
from .measures import dask_metrics, run_metrics
from .output import (
    MISSING_HELP,
    capture_size,
    console,
    describe_loop,
    errors,
    first_few,
    friendly,
    note_first_loop,
    progress,
    text,
)
from .tables import CONVERGENCE_COLUMNS, DAMAGED_ROW, INFO_COLUMNS, convergence_row, info_row

app = typer.Typer(
    help="Record and inspect every iteration of looped-depth language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("loopscope-demo"), "--out", help="Directory for demo.h5 and its figures."),
    steps: int = typer.Option(64, "--steps", help="Iterations of the recurrent block per token."),
    max_new_tokens: int = typer.Option(8, "--max-new-tokens", help="Tokens to generate after the prompt."),
    force: bool = typer.Option(False, "--force", help="Replace a previous demo's files in --out."),
):
    """Capture the shipped demo model (a small trained looped LM) on a prompt; draw its convergence and predictions,
    and write the interactive report."""
    from transformers.utils import logging as hf_logging

    from ..models.demo import check_counts, check_out_dir, run_demo

    check_counts(steps, max_new_tokens)  # before the status line: a refusal is one line, not a spinner first
    check_out_dir(out, force)
    hf_logging.disable_progress_bar()  # the status line below says what is happening
    with console.status("capturing the demo model…"):
        result = run_demo(out, steps=steps, max_new_tokens=max_new_tokens, force=force)
    console.print(f"wrote [bold]{text(result.capture)}[/bold] ({result.tokens} tokens x {steps} iterations)")
    console.print(f"wrote [bold]{text(result.figure)}[/bold]")
    for path in result.predictions:
        console.print(f"wrote [bold]{text(path)}[/bold]")
    console.print(f"wrote [bold]{text(result.report)}[/bold] (open it in a browser: hover, click a token)")


@app.command()
@friendly
def info(
    file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Summarise a capture: model, loops, and one row per run."""
    from ..storage.merge_output import cut_short
    from ..storage.reader import CaptureFile
    from ..storage.run_files import unexpected_files

    merge_note = cut_short(str(file))  # a merge into it, killed while it swapped the old capture for the new
    if merge_note and not (file.exists() or file.is_symlink()):
        raise MergeError(f"no capture at {file}: a merge into it {merge_note}")
    with CaptureFile(file, missing=missing) as capture:
        meta = capture.meta
        console.print(f"[bold]{text(file)}[/bold]  format v{text(meta.get('format_version'))}  {capture_size(file)}")
        model = f"{meta.get('model_class', '?')} {meta.get('name_or_path', '')}".rstrip()
        console.print(f"model   {text(model)}")
        console.print(f"loop    {text(describe_loop(meta.get('loop_json')))}")
        console.print(
            f"created {text(meta.get('created', '?'))} with loopscope {text(meta.get('loopscope_version', '?'))}"
        )
        table = Table(*INFO_COLUMNS)
        damaged = 0
        for run in capture.runs:
            try:
                row = info_row(run)
            except LoopscopeError:  # one damaged run file must not hide the others
                damaged += 1
                row = DAMAGED_ROW
            table.add_row(str(run.index), *row)
        console.print(table)
        if damaged:
            console.print(
                f"[yellow]{damaged} damaged run file(s): `loopscope plot --run N` says what is wrong[/yellow]"
            )
        if capture.incomplete_runs:
            console.print(f"[yellow]{len(capture.incomplete_runs)} incomplete run(s) skipped[/yellow]")
        gone = capture.missing_runs
        if gone:
            console.print(
                f"[yellow]{len(gone)} run(s) the index links are missing, skipped: {first_few(gone, 10)}[/yellow]"
            )
        strays = unexpected_files(capture.path)
        if strays:
            names = first_few(strays, 5)
            console.print(f"[yellow]ignored in the run folder (not run files): {text(names)}[/yellow]")
        if merge_note:
            console.print(f"[yellow]a merge into it {text(merge_note)}[/yellow]")


@app.command()
@friendly
def capture(
    model: str = typer.Argument(..., help="A local model directory or a hub id (loaded with AutoModelForCausalLM)."),
    out: Path = typer.Option(..., "--out", help="Capture file to write (.h5)."),
    prompt: list[str] | None = typer.Option(None, "--prompt", help="Prompt text (one run each; repeat for more)."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="One prompt per line (one run each).", readable=False
    ),
    steps: int | None = typer.Option(None, "--steps", help="Iterations per token (num_steps); default: the model's."),
    max_new_tokens: int = typer.Option(0, "--max-new-tokens", help="Tokens to generate; 0 records one forward."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the model's own code (Huginn)."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N, or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    mode: str = typer.Option("w-", "--mode", help="w- refuses an existing file, w overwrites, a appends runs."),
    seed: int = typer.Option(0, "--seed", help="torch seed set before each prompt (Huginn draws s0 at random)."),
    tokens: str = typer.Option(
        "all", "--tokens", help="Tokens to store: all, prompt, generated, START:STOP[:STEP] or indices like 3,7,12."
    ),
    step_stride: int = typer.Option(1, "--step-stride", help="Store s0, every N-th iteration and each token's last."),
    criterion: str | None = typer.Option(
        None, "--criterion", help="Huginn adaptive exit: kl, entropy-diff, latent-diff, cosine, argmax-stability."
    ),
    exit_threshold: float | None = typer.Option(None, "--exit-threshold", help="Threshold for --criterion."),
):
    """Load a model, run the prompts through it with loopscope attached, and write the capture."""
    from transformers.utils import logging as hf_logging

    from ..hooks.pretrained import capture_prompts, check_counts, check_inputs, load_pretrained, read_prompts
    from ..hooks.selection import from_command_line
    from ..storage.index import check_target

    prompts = read_prompts(prompt, prompt_file)
    selected = from_command_line(tokens)  # a bad --tokens is one line before the model loads
    check_counts(steps, max_new_tokens, seed=seed, tokens=selected)
    check_inputs(out, model, prompt_file)  # the model path, and --out is none of the model's files or the prompts
    check_target(out, mode)  # before the model load, which can take minutes
    hf_logging.disable_progress_bar()  # our own status line says what is loading
    with console.status(f"loading {text(model)}…"):
        loaded, tokenizer = load_pretrained(model, trust_remote_code=trust_remote_code, device=device, dtype=dtype)
    with progress("capturing prompts", len(prompts)) as advance:
        summary = capture_prompts(
            loaded,
            tokenizer,
            prompts,
            out,
            steps=steps,
            max_new_tokens=max_new_tokens,
            mode=mode,
            seed=seed,
            on_prompt=lambda i: advance(1),
            criterion=criterion,
            exit_threshold=exit_threshold,
            tokens=selected,
            step_stride=step_stride,
        )
    console.print(
        f"wrote [bold]{summary.path}[/bold]: {summary.prompts} prompt(s), {summary.tokens} tokens, on {summary.device}"
    )


@app.command()
@friendly
def plot(
    file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False),
    kind: str = typer.Option("heatmap", "--kind", help=plots.KIND_HELP),
    run: list[int] = typer.Option(
        [0],
        "--run",
        help="Run index (see `loopscope info`; negative counts from the last run, -1 the last); repeat for curves.",
    ),
    reference: str = typer.Option(
        "final", "--reference", help="s*: final (each token's last state), a run index, or FILE[:RUN]."
    ),
    out: Path | None = typer.Option(None, "--out", help="Figure file (.png, .pdf or .svg); default KIND.png."),
    space: str = typer.Option(
        "auto", "--space", help="readout (final norm applied, as in the paper), state, or auto (readout if stored)."
    ),
    loop: str | None = typer.Option(None, "--loop", help="Which loop, for models with several."),
    zeros: str = typer.Option(
        "clip", "--zeros", help="heatmap: show s* itself (distance 0) at the floor (clip) or blank (drop)."
    ),
    tokens: str | None = typer.Option(
        None,
        "--tokens",
        help="pca: token indices, e.g. 3,7,-1 (negative: from the last); default fastest, median, slowest to converge.",
    ),
    basis: str = typer.Option("token", "--basis", help="pca: components per token, or shared by the tokens shown."),
    metric: str = typer.Option("distance", "--metric", help="curves: " + ", ".join(METRICS) + "."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="exits/pca: relative distance that counts as converged."),
    other: str | None = typer.Option(None, "--other", help="compare: the second run, as a run index or FILE[:RUN]."),
    signal: str | None = typer.Option(
        None, "--signal", help="signal: which one (see `loopscope info`), e.g. exit_gate."
    ),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Draw a figure of one run (or several, for curves): heatmap, PCA trajectories, curves, exits, compare,
    signal."""
    options = plots.PlotOptions(
        reference=reference,
        space=space,
        loop=loop,
        zeros=zeros,
        tokens=tokens,
        basis=basis,
        metric=metric,
        tol=tol,
        other=other,
        signal=signal,
    )
    for path in plots.draw(file, kind, run, out, missing, options):
        console.print(f"wrote [bold]{text(path)}[/bold]")


app.command("lens")(lens_command.lens)  # in cli/lens.py: it loads the model, unlike every command here
app.command("report")(report_command.report)  # in cli/report.py


@app.command("convergence")
@friendly
def convergence_table(
    file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False),
    out: Path = typer.Option(..., "--out", help="CSV to write: one row per run, token and step."),
    run: list[int] | None = typer.Option(
        None,
        "--run",
        help="Run index (negative counts from the last run, -1 the last); repeat for several (default: all).",
    ),
    reference: str = typer.Option("final", "--reference", help="s*: final, a run index, or FILE[:RUN]."),
    space: str = typer.Option("auto", "--space", help="readout, state, or auto (readout if stored)."),
    loop: str | None = typer.Option(None, "--loop", help="Which loop, for models with several."),
    tol: float = typer.Option(DEFAULT_TOL, "--tol", help="Relative distance that counts as converged."),
    scheduler: str | None = typer.Option(
        None,
        "--scheduler",
        help="Compute with Dask (needs loopscope[scale]): threads, processes, sync, or a cluster's tcp://HOST:PORT.",
    ),
    workers: int | None = typer.Option(None, "--workers", help="Dask on this machine with N threads."),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Every measure per token and step (distance, relative distance, step delta, cosine, norm, update cosine,
    contraction) as CSV."""
    from ..analysis.figure_axes import checked_output, refuse_capture_files
    from ..analysis.reference import parse_reference
    from ..storage.outputs import write_whole
    from ..storage.reader import CaptureFile

    if out.suffix.lower() != ".csv":
        raise LoopscopeError(f"--out {out}: use a .csv file name")
    checked_output(out, (".csv",), "use a .csv file name")  # in a directory that exists, and not one itself
    table = Table(*CONVERGENCE_COLUMNS)
    with CaptureFile(file, missing=missing) as capture:
        refuse_capture_files(capture, [out])  # before any work: the table must not replace the capture it measures
        chosen = _selected_runs(capture, run)
        if not chosen:
            raise LoopscopeError(f"{file} has no complete runs")
        several = next((r for r in chosen if len(r.loops) > 1), None)
        if several is not None and loop is None:  # as plot says it: the CSV's loop column names the one measured
            note_first_loop(several, "measuring")
        on_dask = scheduler is not None or workers is not None
        computed = dask_metrics(file, run, reference, space, loop, scheduler, workers, missing) if on_dask else None

        def write(partial: str) -> int:
            rows = 0
            for i, r in enumerate(chosen):
                m = computed[i] if computed else run_metrics(r, parse_reference(reference), space, loop)
                rows += m.to_csv(partial, tol=tol, append=i > 0)
                table.add_row(*convergence_row(r, m, tol))
            return rows

        rows = write_whole(out, write)  # renamed once every run is in: a failure leaves no half table
    console.print(table)
    console.print(f"wrote [bold]{text(out)}[/bold] ({rows} rows, s* = {text(reference)}, tolerance {tol:g})")


@app.command()
@friendly
def merge(
    out: Path = typer.Argument(..., help="The merged capture to write (.h5)."),
    sources: list[Path] = typer.Argument(
        ..., help="Captures to join, e.g. cap.rank*.h5 from a torchrun job.", readable=False
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Join captures into one whose states are HDF5 virtual datasets over theirs: nothing is copied."""
    from ..storage.merge import merge as merge_captures

    summary = merge_captures(out, sources, force=force)
    console.print(
        f"wrote [bold]{text(summary.path)}[/bold]: {summary.runs} run(s) from {summary.sources} file(s), "
        f"{human_bytes(summary.state_bytes)} of states mapped, {human_bytes(summary.file_bytes)} written"
    )
    if summary.skipped_incomplete:
        console.print(f"[yellow]{summary.skipped_incomplete} incomplete run(s) of the sources left out[/yellow]")
    for path in summary.empty_sources:
        console.print(f"[yellow]{text(path)} has no complete runs[/yellow]")


@app.command()
@friendly
def export(
    file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False),
    format: str = typer.Option(..., "--format", help="npz or safetensors."),
    out: Path | None = typer.Option(None, "--out", help="Output file (default: FILE with the format's suffix)."),
    run: list[int] | None = typer.Option(
        None,
        "--run",
        help="Run index (negative counts from the last run, -1 the last); repeat for several (default: all).",
    ),
    missing: str = typer.Option("error", "--missing", help=MISSING_HELP),
):
    """Write the states and token data to .npz or .safetensors, streamed (bf16 stays bf16 in safetensors)."""
    from ..storage.export import FORMATS
    from ..storage.export import export as export_capture
    from ..storage.reader import CaptureFile

    if format not in FORMATS:
        raise LoopscopeError(f"--format {format}: use one of {', '.join(FORMATS)}")
    with CaptureFile(file, missing=missing) as capture:  # first: "." or "" is a directory, not a name to suffix
        out = out if out is not None else Path(file).with_suffix("." + format)
        chosen = _selected_runs(capture, run)  # a run named twice is refused there
        total = sum(r.dataset(loop).size * r.dataset(loop).dtype.itemsize for r in chosen for loop in r.loops)
        with progress(f"exporting to {text(out.name)}", max(total, 1)) as advance:
            names = export_capture(capture, out, format, runs=[r.index for r in chosen], progress=advance)
    console.print(f"wrote [bold]{text(out)}[/bold] ({len(names)} arrays from {len(chosen)} run(s))")


@app.command()
@friendly
def verify(file: Path = typer.Argument(..., help="A capture file (.h5).", readable=False)):
    """Check every stored chunk against its checksum; list damaged chunks (exit code 1 when there are any)."""
    from dataclasses import replace

    from rich.text import Text

    from ..storage.safety import clean
    from ..storage.verify import describe, verify_capture

    with console.status("checking chunks…"):
        result = verify_capture(file)
    findings = [(f, "damaged") for f in result.damaged] + [(f, "unchecked") for f in result.unchecked]
    findings += [(replace(f, problem=f"incomplete run: {f.problem}"), "unchecked") for f in result.incomplete_problems]
    if findings:
        table = Table("run", "dataset", "where", "problem")
        for f, kind in findings:
            run = Text("index" if f.run is None else str(f.run))
            problem = Text(clean(f.problem), style="red" if kind == "damaged" else "yellow")
            table.add_row(run, Text(clean(f.dataset or Path(f.file).name)), Text(clean(f.where or "-")), problem)
        console.print(table)
    console.print(Text(describe(result)))
    if result.incomplete:
        console.print(
            Text(
                f"{len(result.incomplete)} incomplete run file(s) (being written, or cut short by a crash) checked "
                f"too: {len(result.incomplete_problems)} unreadable or damaged; not counted against the capture, "
                "whose readers skip them",
                style="yellow",
            )
        )
    if result.unchecked:
        console.print(
            Text(
                f"warning: {len(result.unchecked)} dataset(s) not checksummed (written before "
                "checksums); their bytes cannot be checked",
                style="yellow",
            )
        )
    if not result.ok:
        errors.print(Text(f"error: {len(result.damaged)} damaged chunk(s) or file(s) in {clean(file)}", style="red"))
        raise typer.Exit(1)
    console.print(Text(f"ok: every checksummed chunk of {clean(file)} matches", style="green"))


def _selected_runs(capture, indices: list[int] | None) -> list:
    """The runs named by repeated ``--run`` options (each once), or every complete run when none is given."""
    return capture.select(indices, "--run") if indices else capture.runs


def main() -> None:
    app()
