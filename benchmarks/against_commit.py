"""Is this tree's decoding capture cheaper than an earlier commit's? Both in one process, runs interleaved.

    python benchmarks/against_commit.py HEAD~1            # ~1.5 min on 2 CPU cores
    python benchmarks/against_commit.py 32ffc85 --repeats 15 --new-tokens 128

Why one process: on a shared VM, the same script run twice gives ratios that differ by more than a change worth
keeping (``overhead.py``'s tiny size moved by up to 4 points between back-to-back runs). Here the commit's package is
extracted with ``git archive`` into a temporary folder and imported as ``loopscope_base`` next to this tree's
``loopscope``; plain, the commit's capture and this tree's take turns on one model (the tiny reference model,
greedy ``generate()``), in rotating order. Columns: total wall time (attach, generate, close) and the process's CPU
time against plain, and the model's own thread's CPU time (``time.thread_time``, the hooks' cost without the
writer's), per decoded token. Outputs are checked identical across every run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import torch

import loopscope

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_commit(commit: str, folder: str):
    """The package of ``commit`` (a git revision of this repository), imported as ``loopscope_base``."""
    package = os.path.join(folder, "loopscope_base")
    os.makedirs(package)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"git archive {commit} failed: {archive.stderr.decode().strip()}; pass a commit of this repository")
    subprocess.run(["tar", "-x", "-C", package], input=archive.stdout, check=True)
    sys.path.insert(0, folder)
    return importlib.import_module("loopscope_base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("commit", help="the revision to compare with (HEAD~1, a hash, a tag)")
    parser.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    parser.add_argument("--new-tokens", type=int, default=256, help="decoded tokens per generate() (default 256)")
    parser.add_argument("--steps", type=int, default=8, help="iterations per token (default 8)")
    args = parser.parse_args()

    model = c.build_model(c.SIZES["tiny"]["config"])
    ids = c.prompt(model, 32)
    with tempfile.TemporaryDirectory() as folder, c.workdir() as work:
        captures = {args.commit: import_commit(args.commit, folder), "this tree": loopscope}

        def run(variant: str):
            path = os.path.join(work, "x.h5")
            t0, cpu0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
            if variant == "plain":
                out = c.generate(model, ids, args.steps, args.new_tokens)
            else:
                capture = captures[variant].attach(model, path, mode="w")
                out = c.generate(model, ids, args.steps, args.new_tokens)
                capture.close()
            timed = (time.perf_counter() - t0, time.process_time() - cpu0, time.thread_time() - main0)
            c.clear_dir(work)
            return timed, out

        variants = ["plain", *captures]
        for v in variants:  # warm-up
            run(v)
        results = c.interleaved(variants, args.repeats, run)

    outputs = [out for rs in results.values() for _, out in rs]
    same = all(torch.equal(outputs[0], o) for o in outputs)
    plain = [c.median(t[i] for t, _ in results["plain"]) for i in range(3)]
    fastest_plain = min(t[0] for t, _ in results["plain"])
    rows = []
    for v in variants[1:]:
        wall, cpu, main_cpu = (c.median(t[i] for t, _ in results[v]) for i in range(3))
        rows.append(
            [
                v,
                f"{wall / plain[0]:.3f}",
                f"{min(t[0] for t, _ in results[v]) / fastest_plain:.3f}",
                f"{cpu / plain[1]:.3f}",
                f"{(main_cpu - plain[2]) / args.new_tokens * 1e6:+.0f}",
                f"{(cpu - plain[1]) / args.new_tokens * 1e6:+.0f}",
            ]
        )
    c.table(
        f"tiny reference model, {args.steps} steps, prompt 32 + {args.new_tokens} new tokens; median of "
        f"{args.repeats} interleaved rounds; {c.machine_line()}",
        ["capture", "x plain", "min x plain", "CPU x plain", "model thread CPU us/token", "process CPU us/token"],
        rows,
        caption=f"outputs identical across all runs: {'yes' if same else 'NO'}",
    )


if __name__ == "__main__":
    main()
