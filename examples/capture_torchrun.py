"""Data-parallel capture: every rank of a ``torchrun`` job records its share of the prompts into its own file.

    torchrun --standalone --nproc_per_node 2 -m loopscope.examples.capture_torchrun --out study/cap.h5
    loopscope merge study/all.h5 study/cap.rank*.h5

Rank r takes prompts r, r + W, r + 2W, ... (W = world size) and ``loopscope.attach(model, "study/cap.h5")`` writes
``study/cap.rank0000r.h5`` with the rank, world size, local rank and host in its header; the one line is the same as
in a single process. Without ``--model`` the Huginn-shaped reference model is built from a fixed seed (every rank
gets the same weights); with ``--model`` a local directory or hub id is loaded, on ``cuda:LOCAL_RANK`` when CUDA is
available. ``accelerate launch`` sets the same environment variables and works the same way.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import loopscope

DEFAULT_PROMPTS = [
    "Looped models think by iterating.",
    "The state settles into a fixed point.",
    "Some tokens orbit instead of settling.",
    "A longer prompt gives the loop more to do.",
]


def build(model_name: str | None, seed: int):
    """(model, tokenizer): the reference model from ``seed``, or a pretrained one on this rank's device."""
    if model_name:
        from loopscope.hooks.pretrained import load_pretrained

        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        return load_pretrained(model_name, device=device)
    from loopscope.models.demo_tokenizer import build_tokenizer
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config

    tokenizer = build_tokenizer()
    register()
    torch.manual_seed(seed)
    config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer))
    return RavenReferenceForCausalLM(config).eval(), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="cap.h5", help="capture path; each rank writes OUT with .rankNNNNN inserted")
    parser.add_argument("--prompt-file", help="one prompt per line (default: four built-in prompts)")
    parser.add_argument("--model", help="a local model directory or hub id (default: the reference model)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    backend = "nccl" if args.model and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        prompts = DEFAULT_PROMPTS
        if args.prompt_file:
            with open(args.prompt_file, encoding="utf-8") as handle:
                prompts = [line.rstrip("\n") for line in handle if line.strip()]
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # every rank may make it: exist_ok
        model, tokenizer = build(args.model, args.seed)
        device = next(model.parameters()).device
        with loopscope.attach(model, args.out, tokenizer=tokenizer, mode="w") as cap:  # the one added line
            for prompt in prompts[rank::world]:
                ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
                torch.manual_seed(args.seed)  # Huginn draws s0 at random: the same prompt gives the same capture
                model.generate(ids, num_steps=args.steps, max_new_tokens=args.max_new_tokens, do_sample=False)
            path = cap.path
        print(f"rank {rank}/{world}: wrote {path}", flush=True)
        dist.barrier()  # every rank file is complete before anyone merges
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    with torch.no_grad():
        main()
