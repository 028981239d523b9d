"""Where should a capture's HDF5 work run while the model holds every core: in a thread of the model's process, or
in a process of its own?

    python benchmarks/writer_placement.py             # ~3 min on 2 CPU cores
    python benchmarks/writer_placement.py --small     # ~30 s smoke run

The question behind it: with torch on every core, a prefill capture costs ~1.10 x plain whatever the writer thread
does, and loopscope's writer thread is already as cheap as plain h5py for the same files. Yet plain forwards do not
keep the cores busy (the process's CPU time is ~1.5 x its wall time on 2 cores): between torch's parallel kernels
the model's thread runs Python, holding the GIL, and the other core idles. A writer thread cannot use those moments
(it needs the GIL, and h5py holds it through every HDF5 call); a writer process can.

Every variant does the same work on the same model and prompts as ``prefill_overhead.py`` (5 forwards of 8 x 128
tokens, the reference model, 16 steps): a hook on the loop's exit copies each state into a host buffer (shared
memory), and at each forward's end the writer is told to write that forward's 8 run files (15 attributes, the
states [16, 128, 256] float32 in Fletcher-32 chunks of 4 steps, 5 per-token datasets), from that buffer, which it
reads cold as loopscope's writer does. Only where the writer runs changes:

* plain            the forwards alone;
* copies only      the hook's copies, no writer (what the model's side costs);
* thread           the writer in a thread of this process (loopscope's design);
* process          the writer in a child process (started inside the timed capture: its start is part of the cost);
* process, idle    the same child at ``SCHED_IDLE`` (Linux; it runs only on a core nobody else wants).

``--hot``: the writer writes blocks it has just filled itself instead of the states, so nothing is read cold; the
gap between the two runs is what reading the model's states costs where the writer runs.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import numpy as np
import torch
from _placement_writer import write_forward

VARIANTS = ("plain", "copies only", "thread", "process", "process, idle")
CONFIG = dict(n_embd=256, num_attention_heads=4, intermediate_size=512)

WRITER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_placement_writer.py")


def capture(
    variant: str, model, batches, steps: int, buffer: np.ndarray, memory_path: str, folder: str, hot: bool = False
):
    """(wall s, writer CPU s) of one capture in ``variant``."""
    view = torch.from_numpy(buffer)
    where = {"forward": 0, "step": 0}

    def copy(module, args, output):
        view[where["forward"], where["step"]].copy_(output)
        where["step"] += 1

    t0 = time.perf_counter()
    send, finish = _writer(variant, buffer, memory_path, folder, hot)
    hook = None if variant == "plain" else model.transformer.core_block[-1].register_forward_hook(copy)
    try:
        with torch.no_grad():
            for f, ids in enumerate(batches):
                where.update(forward=f, step=0)
                model(ids, num_steps=steps)
                send(f)
        writer_cpu = finish()
    finally:
        if hook is not None:
            hook.remove()
    elapsed = time.perf_counter() - t0
    c.clear_dir(folder)
    return elapsed, writer_cpu


def _writer(variant: str, buffer: np.ndarray, memory_path: str, folder: str, hot: bool):
    """(send(forward), finish() -> writer CPU s) for the variant's writer."""
    if variant in ("plain", "copies only"):
        return (lambda f: None), (lambda: 0.0)
    if variant == "thread":
        todo: queue.Queue = queue.Queue()
        cpu = [0.0]

        def serve() -> None:
            while (f := todo.get()) is not None:
                write_forward(buffer, f, folder, hot)
            cpu[0] = time.thread_time()

        thread = threading.Thread(target=serve)
        thread.start()

        def finish_thread() -> float:
            todo.put(None)
            thread.join()
            return cpu[0]

        return todo.put, finish_thread
    import json

    argument = json.dumps([memory_path, list(buffer.shape), folder, variant == "process, idle", hot])
    child = subprocess.Popen([sys.executable, WRITER_SCRIPT, argument], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None

    def send(f: int) -> None:
        child.stdin.write(f"{f}\n".encode())
        child.stdin.flush()

    def finish_child() -> float:
        child.stdin.close()
        cpu = float(child.stdout.readline())
        child.wait()
        return cpu

    return send, finish_child


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~30 s smoke run: 2 forwards of 4 x 64 tokens, 3 repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9, --small 3)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--hot", action="store_true", help="the writer writes blocks it fills itself: nothing read cold")
    a = p.parse_args()
    forwards, batch, tokens = (2, 4, 64) if a.small else (5, 8, 128)
    repeats = a.repeats or (3 if a.small else 9)
    model = c.build_model(CONFIG)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g) for _ in range(forwards)]
    shape = (forwards, a.steps, batch, tokens, CONFIG["n_embd"])
    # Memory both processes map: a file in shared memory (/dev/shm where there is one), as a writer process would use
    memory = tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None, suffix=".states")
    buffer: np.ndarray = np.memmap(memory.name, np.float32, "w+", shape=shape)
    c.console.print(f"[bold]loopscope writer placement[/bold] - {c.machine_line()}")
    c.console.print(
        f"{forwards} forwards of {batch} x {tokens} tokens, {a.steps} steps: {buffer.nbytes / c.MB:.0f} MB of states "
        f"per capture, {forwards * batch} run files{' (the writer writes blocks it fills itself)' if a.hot else ''}; "
        f"{repeats} interleaved rounds"
    )
    variants = [v for v in VARIANTS if v != "process, idle" or hasattr(os, "SCHED_IDLE")]
    try:
        with c.workdir() as folder:

            def run(variant: str) -> tuple[float, float]:
                return capture(variant, model, batches, a.steps, buffer, memory.name, folder, a.hot)

            for v in variants:  # warm-up
                run(v)
            times = c.interleaved(variants, repeats, run)
    finally:
        memory.close()
    rows = [
        row + [f"{statistics.median(r[1] for r in times[v]):.3f}" if v not in ("plain", "copies only") else "-"]
        for v, row in zip(variants, c.wall_rows(times, variants))
    ]
    c.table(
        "wall time per capture",
        ["variant", "min s", "median s", "min x plain", "median x plain", "writer CPU s"],
        rows,
        caption="writer CPU: the thread's, or the child process's whole CPU time (its start included)",
    )


if __name__ == "__main__":
    main()
