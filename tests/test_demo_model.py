"""The shipped demo model: it loads offline, has learnt something, and its tokens converge at different speeds."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import loopscope
from loopscope.analysis import token_metrics
from loopscope.models.demo import MODEL_DIR, PROMPT, build_demo_model
from loopscope.models.huginn_reference import RavenReferenceForCausalLM

HELD_OUT = "Return the number of items in a container. The argument may be a sequence or a collection."


def _loss(model, ids) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        return float(model(ids[:, :-1], labels=ids[:, 1:]).loss)


def test_shipped_files_and_training_record():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json"} <= names
    assert (MODEL_DIR / "model.safetensors").stat().st_size < 8 << 20
    record = json.loads((MODEL_DIR / "training.json").read_text())
    final = record["final"]
    assert final["val_loss"] < 0.8 * final["random_init_val_loss"]


def test_demo_model_beats_its_random_initialisation():
    model, tokenizer = build_demo_model()
    ids = tokenizer(HELD_OUT, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == HELD_OUT  # byte-level BPE round-trips
    torch.manual_seed(0)
    untrained = RavenReferenceForCausalLM(model.config).eval()
    assert _loss(model, ids) < 0.8 * _loss(untrained, ids)


def test_tokens_converge_at_different_speeds(tmp_path):
    model, tokenizer = build_demo_model()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    path = tmp_path / "demo.h5"
    with loopscope.attach(model, path, tokenizer=tokenizer):
        torch.manual_seed(0)
        model.generate(ids, num_steps=32, max_new_tokens=4, do_sample=False)
    with loopscope.open(path) as capture:
        steps = token_metrics(capture.runs[0]).convergence_steps(1e-2)
    assert steps.min() >= 0
    assert np.ptp(steps) >= 5, steps  # fast and slow tokens, several iterations apart


def test_loading_the_demo_model_prints_nothing_and_leaves_progress_bars_as_they_were(capfd):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()  # the CLI's commands switch bars off for their process
    hf_logging.enable_progress_bar()
    try:
        build_demo_model()
        out, err = capfd.readouterr()
        assert out == "" and "Loading weights" not in err, err
        assert hf_logging.is_progress_bar_enabled()  # a library call does not switch off the user's bars
    finally:
        if not was:
            hf_logging.disable_progress_bar()


@pytest.mark.parametrize("example", ["train_demo_model", "capture_generate", "capture_torchrun"])
def test_every_example_starts_as_its_docstring_says(example):
    """``python -m loopscope.examples.NAME --help``: each imports what it needs from where it now lives."""
    result = subprocess.run(
        [sys.executable, "-m", f"loopscope.examples.{example}", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "-1"], "--steps -1: give a positive number"),
        (["--steps", "0"], "--steps 0: give a positive number"),
        (["--max-new-tokens", "0"], "--max-new-tokens 0: give a positive number"),
        (["--max-new-tokens", "300", "--steps", "2"], "context holds 256 tokens and the prompt takes 42; give at most"),
    ],
)
def test_bad_demo_arguments_are_one_line_and_write_nothing(tmp_path, args, message):
    """Refused before the demo folder is made: a failed demo must not leave files that the next one refuses."""
    from typer.testing import CliRunner

    from loopscope.cli.app import app

    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), *args])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert not out.exists()
