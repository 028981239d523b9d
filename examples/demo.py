"""`loopscope demo`: capture the reference looped model on a prompt and draw its convergence heatmap.

Runs offline in seconds: the model is the Huginn-shaped reference model built from a tiny config with a fixed
seed, the tokenizer is trained on the spot from text shipped in ``demo_tokenizer.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

PROMPT = "The looped block reads the same tokens again and again until its state settles."


@dataclass
class DemoResult:
    capture: Path
    figure: Path
    tokens: int


def build_demo_model(seed: int = 0):
    """The reference model and tokenizer used by the demo (random weights, deterministic)."""
    from .demo_tokenizer import build_tokenizer
    from .huginn_reference import RavenReferenceForCausalLM, register, tiny_config

    register()
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer))
    model = RavenReferenceForCausalLM(config).eval()
    return model, tokenizer


def run_demo(out_dir: str | os.PathLike, steps: int = 64, max_new_tokens: int = 8, seed: int = 0) -> DemoResult:
    """Capture ``PROMPT`` plus ``max_new_tokens`` greedy tokens at ``steps`` iterations; write the h5 and the PNG."""
    import loopscope
    from loopscope.analysis import convergence
    from loopscope.analysis.figures import heatmap

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    capture_path, figure_path = out / "demo.h5", out / "convergence.png"
    model, tokenizer = build_demo_model(seed)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
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
            title=f"Convergence of the latent state, {steps} iterations (reference model)",
        )
        tokens = run.num_tokens
    return DemoResult(capture_path, figure_path, tokens)


if __name__ == "__main__":
    result = run_demo("loopscope-demo")
    print(f"wrote {result.capture} and {result.figure}")
