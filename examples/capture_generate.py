"""The one-line use: record every iteration of a looped model during ``generate()``, then read it back.

    python -m loopscope.examples.capture_generate --out run.h5

Swap the reference model for your own (e.g. Huginn-0125 loaded with ``trust_remote_code=True``); only the
``loopscope.attach`` line is loopscope's.
"""

from __future__ import annotations

import argparse

import torch

import loopscope
from loopscope.models.demo import build_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="run.h5")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    model, tokenizer = build_demo_model()
    ids = tokenizer("A looped model iterates its latent state.", return_tensors="pt").input_ids

    cap = loopscope.attach(model, args.out, tokenizer=tokenizer, mode="w")  # the one added line
    model.generate(ids, num_steps=args.steps, max_new_tokens=args.max_new_tokens, do_sample=False)
    cap.close()

    with loopscope.open(args.out) as capture:
        run = capture.runs[0]
        distances = loopscope.analysis.convergence(run)
        print(f"{run.num_tokens} tokens, {int(run.num_steps.max())} iterations each")
        for token, row in zip(run.tokens[:10], distances[:10]):
            print(f"{token!r:>12}  ||s_1 - s*|| = {row[1]:.3e}   ||s_16 - s*|| = {row[min(16, len(row) - 1)]:.3e}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
