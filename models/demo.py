"""`loopscope demo`: capture the shipped demo model on a prompt, draw its convergence heatmap and what each
iteration would predict (the readout lens's grid), and write the interactive report of the capture.

Runs offline in seconds: the model is a small looped-depth LM of the Huginn-shaped reference architecture,
trained once by ``train_demo_model.py`` and shipped in ``demo_model/`` (weights, tokenizer, model card).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LoopscopeError

MODEL_DIR = Path(__file__).parent / "demo_model"
DEMO_FILES = ("demo.h5", "demo.h5.runs", "convergence.png", "predictions.png", "report.html")
DEMO_PAGE = re.compile(r"^(convergence|predictions)-p\d+\.png$")  # a long generation's figure pages
PROMPT = "Twelve ravens flew over the harbour at dawn, and the old ferryman counted them twice."


@dataclass
class DemoResult:
    capture: Path
    figure: Path
    tokens: int
    predictions: list[Path]  # the prediction grid (one file; pages only for a very long generation)
    report: Path  # the interactive HTML report, with the lens's predictions per token and step


def build_demo_model(seed: int = 0):
    """The shipped demo model (eval mode) and its tokenizer. ``seed`` is kept for callers; the weights are fixed."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    from .huginn_reference import RavenReferenceForCausalLM, register

    register()
    torch.manual_seed(seed)
    shown = hf_logging.is_progress_bar_enabled()  # a 5 MB local load needs no progress bar on stderr
    hf_logging.disable_progress_bar()
    try:
        model = RavenReferenceForCausalLM.from_pretrained(MODEL_DIR).eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR)
    return model, tokenizer


def run_demo(
    out_dir: str | os.PathLike, steps: int = 64, max_new_tokens: int = 8, seed: int = 0, *, force: bool = False
) -> DemoResult:
    """Capture ``PROMPT`` plus ``max_new_tokens`` greedy tokens at ``steps`` iterations; write the h5, the
    convergence heatmap and the prediction grid. A folder holding a previous demo's files is refused unless
    ``force``: they may be a run someone means to keep, as ``loopscope capture`` refuses an existing file."""
    import loopscope
    from loopscope.analysis import convergence
    from loopscope.analysis.figure_axes import prompt_rows
    from loopscope.analysis.figures import heatmap
    from loopscope.analysis.lens_figures import prediction_grid
    from loopscope.analysis.readout_lens import lens
    from loopscope.report import write_report

    out = Path(out_dir)
    check_counts(steps, max_new_tokens)
    check_out_dir(out, force)
    model, tokenizer = build_demo_model(seed)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    room = int(model.config.block_size) - ids.shape[1]  # its rotary table ends there: past it, an index error
    if max_new_tokens > room:
        raise LoopscopeError(
            f"--max-new-tokens {max_new_tokens}: the demo model's context holds {model.config.block_size} tokens "
            f"and the prompt takes {ids.shape[1]}; give at most {room}"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LoopscopeError(f"cannot create {out}: {exc.strerror or exc}; pass a directory you can write") from None
    capture_path, figure_path, grid_path = out / "demo.h5", out / "convergence.png", out / "predictions.png"
    with loopscope.attach(model, capture_path, tokenizer=tokenizer, mode="w"):
        torch.manual_seed(seed)
        model.generate(ids, num_steps=steps, max_new_tokens=max_new_tokens, do_sample=False)
    with loopscope.open(capture_path) as capture:
        run = capture.runs[0]
        heatmap(
            convergence(run),
            figure_path,
            tokens=run.tokens,
            positions=run.positions,
            prompt=prompt_rows(run),
            title=f"Convergence of the latent state, {steps} iterations (demo model)",
        )
        predicted = lens(run, model, tokenizer=tokenizer)
        grids = prediction_grid(
            predicted, grid_path, title=f"Top-1 prediction per iteration, {steps} iterations (demo model, logit lens)"
        )
        tokens = run.num_tokens
        report = write_report(capture, out / "report.html", model=model, tokenizer=tokenizer)
    return DemoResult(capture_path, figure_path, tokens, [Path(p) for p in grids], report)


def check_counts(steps: int, max_new_tokens: int) -> None:
    """Positive iteration and token counts (the demo is a generate() run: it needs at least one new token)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise LoopscopeError(f"--steps {steps}: give a positive number of iterations, e.g. 64")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise LoopscopeError(f"--max-new-tokens {max_new_tokens}: give a positive number of tokens, e.g. 8")


def check_out_dir(out: Path, force: bool) -> None:
    """``out`` is a folder to write into (made if missing) without replacing a previous demo's files unless
    ``force``."""
    if out.exists() and not out.is_dir():
        raise LoopscopeError(f"{out} is a file, not a directory; pass a directory for the demo's files")
    if force or not out.is_dir():
        return
    previous = sorted(p.name for p in out.iterdir() if p.name in DEMO_FILES or DEMO_PAGE.match(p.name))
    if previous:
        raise LoopscopeError(
            f"{out} already holds a previous demo ({', '.join(previous)}); pass --force (force=True) to replace "
            "it, or another directory"
        )


if __name__ == "__main__":
    result = run_demo("loopscope-demo")
    print(f"wrote {result.capture}, {result.figure}, {', '.join(map(str, result.predictions))} and {result.report}")
