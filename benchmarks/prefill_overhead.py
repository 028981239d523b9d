"""What does recording cost a prefill-heavy workload, against no recording and against the recorder a user would
write by hand?

    python benchmarks/prefill_overhead.py            # ~2 min on 2 CPU cores
    python benchmarks/prefill_overhead.py --small    # ~20 s smoke run

The workload: ``--forwards`` forward calls (default 5) of a batch of ``--batch`` x ``--tokens`` tokens (8 x 128) on
the reference model (E=256, 4 heads, intermediate 512, ``--steps`` 16 iterations): 5 x 8 x 128 x 17 states of 256
floats, 89 MB of float32 states per capture. Variants, interleaved and rotated each round:

* plain       the forwards alone;
* loopscope   ``loopscope.attach(model, path)`` once, the forwards, ``close()`` (which waits for the last write);
* recorder    a forward hook on the loop's exit that clones each state into a list, and at the end one h5py dataset
              per forward ([B, T, steps, E], written whole): what a user writes by hand. Its s0 is not recorded, so
              it stores 16 of loopscope's 17 states per token.
* raw thread  the least any recorder that stores while the model runs can do: the same hook hands each clone to a
              thread that appends its bytes to one plain file (no format, no checksum, no metadata). It is the
              floor for writing in the background on this machine: what is left of loopscope's cost above it is
              its checksums and its per-run HDF5 files.

The first table shows minima and medians of each variant's wall time and their ratios to plain: on this 2-core VM the
spreads are wide, so compare minima first. The second shows CPU seconds, far less sensitive to other processes on
the machine: the process's (every thread: the model's, the hooks', loopscope's writer) and the writer thread's own.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import threading
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import h5py
import torch

import loopscope

VARIANTS = ("plain", "loopscope", "recorder", "raw thread")
CONFIG = dict(n_embd=256, num_attention_heads=4, intermediate_size=512)


def forwards(model, batches, steps: int) -> None:
    with torch.no_grad():
        for ids in batches:
            model(ids, num_steps=steps)


def forwards_cloning(model, batches, steps: int, take) -> None:
    """The forwards with the hand-written hook: a clone of each state on the loop's exit goes to ``take``."""
    hook = model.transformer.core_block[-1].register_forward_hook(
        lambda module, args, output: take(output.detach().clone())
    )
    try:
        forwards(model, batches, steps)
    finally:
        hook.remove()


def raw_thread(model, batches, steps: int, path: str) -> None:
    """Clones handed to a background thread that appends their bytes to one file (see the module docstring)."""
    pending: queue.Queue = queue.Queue(maxsize=256)

    def append() -> None:
        with open(path, "wb", buffering=0) as f:
            while (state := pending.get()) is not None:
                f.write(state.numpy().data)

    thread = threading.Thread(target=append)
    thread.start()
    try:
        forwards_cloning(model, batches, steps, pending.put)
    finally:
        pending.put(None)
        thread.join()


def run_variant(variant: str, model, batches, steps: int, workdir: str) -> tuple[float, float, float]:
    """(wall s, process CPU s, writer thread CPU s) of one capture."""
    path = os.path.join(workdir, f"{variant}.h5")
    writer_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "plain":
        forwards(model, batches, steps)
    elif variant == "loopscope":
        capture = loopscope.attach(model, path, mode="w")
        forwards(model, batches, steps)
        capture.close()
        writer_cpu = capture.writer.cpu_seconds
    elif variant == "raw thread":
        raw_thread(model, batches, steps, path)
    else:
        states: list[torch.Tensor] = []
        forwards_cloning(model, batches, steps, states.append)
        with h5py.File(path, "w") as f:
            for i in range(len(batches)):
                f.create_dataset(f"forward_{i}", data=torch.stack(states[i * steps : (i + 1) * steps], 2).numpy())
        states.clear()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    c.clear_dir(workdir)
    return elapsed, cpu, writer_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~20 s smoke run: 2 forwards of 4 x 64 tokens, 3 repeats")
    p.add_argument("--forwards", type=int, default=None, help="forward calls per capture (default 5)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per row (default 128)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, --small 3)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default torch's: every core; fewer leave one free)"
    )
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n_forwards = a.forwards or (2 if a.small else 5)
    batch, tokens = a.batch or (4 if a.small else 8), a.tokens or (64 if a.small else 128)
    repeats = a.repeats or (3 if a.small else 9)
    model = c.build_model(CONFIG)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g) for _ in range(n_forwards)]
    state_mb = n_forwards * batch * tokens * (a.steps + 1) * CONFIG["n_embd"] * 4 / c.MB
    c.console.print(f"[bold]loopscope prefill overhead[/bold] - {c.machine_line()}")
    c.console.print(
        f"{n_forwards} forwards of {batch} x {tokens} tokens, E={CONFIG['n_embd']}, {a.steps} steps: "
        f"{state_mb:.0f} MB of float32 states per capture; {repeats} interleaved rounds"
    )
    with c.workdir() as work:
        for v in VARIANTS:  # warm-up: first-call costs out of the timings
            run_variant(v, model, batches[:1], a.steps, work)
        times = c.interleaved(VARIANTS, repeats, lambda v: run_variant(v, model, batches, a.steps, work))
    best = {v: min(r[0] for r in rs) for v, rs in times.items()}
    median = {v: statistics.median(r[0] for r in rs) for v, rs in times.items()}
    cpu = {v: statistics.median(r[1] for r in rs) for v, rs in times.items()}
    cpu_min = {v: min(r[1] for r in rs) for v, rs in times.items()}
    writer = {v: statistics.median(r[2] for r in rs) for v, rs in times.items()}
    rows = c.wall_rows(times, VARIANTS)
    c.table("wall time per capture", ["variant", "min s", "median s", "min x plain", "median x plain"], rows)
    for other in ("recorder", "raw thread"):
        c.console.print(
            f"loopscope / {other}: {best['loopscope'] / best[other]:.3f} (minima), "
            f"{median['loopscope'] / median[other]:.3f} (medians)"
        )
    rows = [
        [
            v,
            f"{cpu_min[v]:.3f}",
            f"{cpu[v]:.3f}",
            f"{cpu[v] - cpu['plain']:+.3f}",
            f"{cpu[v] / cpu['plain']:.3f}",
            f"{writer[v]:.3f}" if v == "loopscope" else "-",
        ]
        for v in VARIANTS
    ]
    c.table(
        "CPU time per capture (all threads of the process)",
        ["variant", "min s", "median s", "over plain s", "median x plain", "writer thread s"],
        rows,
    )


if __name__ == "__main__":
    main()
