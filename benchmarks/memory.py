"""Does host memory stay flat while loopscope records a long generation, where a hand-written recorder grows?

    python benchmarks/memory.py            # ~2.5 min on 2 CPU cores (--repeats 2: ~5 min)
    python benchmarks/memory.py --small    # ~20 s smoke run (3 processes; importing torch takes 4 s each)

For each variant and each number of generated tokens, a fresh subprocess builds the model, warms the variant up
(2 tokens), resets its peak RSS (``/proc/self/clear_refs``), generates, and reports VmHWM minus the RSS just before
generate(). Fresh processes keep one run's peak from hiding in another's. Variants: plain (no hooks: the KV cache
and the outputs grow with every token in all three), loopscope (attach ... close) and naive (hook appending
``.detach().cpu()``, h5py write at the end; ``non_blocking`` behaves the same on CPU). The columns "- plain"
subtract the plain run of the same length, leaving what recording adds.

The model: the reference model at n_embd=256, 4 heads, intermediate 512, one core block, 32 steps: 33 KB of
states per token, cheap enough per token on a CPU to reach 1024 tokens in the time budget. Children run two at a
time (``--jobs``): RSS is per process, and nothing here is timed.

What to expect (see README.md): loopscope's extra memory is bounded by ``buffer_mb`` of host slabs plus half as
much again for chunks the writer is assembling (``writer.STAGING_SHARE``; run files have no chunk cache), plus
HDF5's own bookkeeping of the open run file, which grows by tens of bytes per token (its chunk index). The
``--writer`` table isolates the writer from the model: synthetic decode messages, RSS sampled as tokens grow.
naive keeps every state, and its peak is erratic on top of that: tens of thousands of small
tensors kept alive fragment glibc's heap arenas (the OpenMP worker threads allocate in arenas of their own), so
the same 512-token run peaked anywhere from 66 to 353 MiB over 11 processes, and 1024 tokens from 0.13 to 1.3 GiB
over 5; ``MALLOC_ARENA_MAX=1`` or ``MALLOC_MMAP_THRESHOLD_=131072`` brings 1024 tokens back to ~130 MiB. Use
``--repeats 2`` to see the spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported

MODEL = dict(n_embd=256, num_attention_heads=4, intermediate_size=512, n_layers_in_recurrent_block=1, block_size=4096)
STEPS = 32
PROMPT = 16
VARIANTS = ("plain", "loopscope", "naive")


def child(variant: str, tokens: int) -> None:
    """Runs in the subprocess: one measurement, printed as one JSON line."""
    model = c.build_model(MODEL)
    ids = c.prompt(model, PROMPT)
    with c.workdir() as work:
        c.run_variant(variant, model, ids, STEPS, 2, work)  # warm-up: imports, allocator, first-call paths
        gc.collect()
        reset = c.reset_peak_rss()
        rss0 = c.proc_status_kb("VmRSS")
        hwm0 = c.proc_status_kb("VmHWM")
        result = c.run_variant(variant, model, ids, STEPS, tokens, work)
        hwm1 = c.proc_status_kb("VmHWM")
    # Without a reset, a peak reached before generate() (model init) can hide growth: say so.
    print(
        json.dumps(
            dict(growth_kb=hwm1 - rss0, reset=reset, hwm_before_kb=hwm0, bytes=result.bytes, seconds=result.total_s)
        )
    )


def measure(variant: str, tokens: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(tokens)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="smoke run: 64 tokens only")
    p.add_argument("--tokens", default=None, help="comma-separated counts (default 32,128,512,1024)")
    p.add_argument("--repeats", type=int, default=None, help="processes per cell (default 1)")
    p.add_argument("--jobs", type=int, default=2, help="subprocesses at a time (default 2)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of plain,loopscope,naive")
    p.add_argument(
        "--writer",
        type=int,
        default=None,
        metavar="TOKENS",
        help="instead: RSS of the writer alone over TOKENS decoded tokens (no model)",
    )
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]))
        return
    if a.writer:
        writer_alone(a.writer)
        return
    variants = tuple(v for v in a.variants.split(",") if v)
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes a comma-separated subset of {','.join(VARIANTS)}")
    repeats = a.repeats or 1
    counts = [int(t) for t in (a.tokens or ("64" if a.small else "32,128,512,1024")).split(",")]
    c.console.print(f"[bold]loopscope memory[/bold] - {c.machine_line()}")
    c.console.print(
        f"model: n_embd={MODEL['n_embd']}, intermediate {MODEL['intermediate_size']}, 1 core block, {STEPS} steps, "
        f"prompt {PROMPT}; peak RSS growth during generate(), one fresh process per cell"
    )
    cells = [(v, t) for t in counts for v in variants for _ in range(repeats)]
    # Two children at a time: each measures only its own RSS, and the machine has the cores for it.
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        measured = list(pool.map(lambda cell: measure(*cell), cells))
    results: dict[tuple, list[dict]] = {}
    for cell, r in zip(cells, measured):
        results.setdefault(cell, []).append(r)
    if not all(r["reset"] for r in measured):
        c.console.print("[yellow]could not reset VmHWM (/proc/self/clear_refs): growth may be understated[/yellow]")

    def mib(v, t):
        return sorted(r["growth_kb"] / 1024 for r in results[v, t])

    def cell(values):
        if len(values) == 1 or values[-1] - values[0] < 1:
            return f"{values[0]:.1f}"
        return f"{values[0]:.1f}-{values[-1]:.1f}"

    rows = []
    extra = [v for v in variants if v != "plain"] if "plain" in variants else []
    for t in counts:
        low = {v: mib(v, t)[0] for v in variants}
        states = f"{t * (STEPS + 1) * MODEL['n_embd'] * 4 / 2**20:.1f}"
        rows.append(
            [t, states] + [cell(mib(v, t)) for v in variants] + [f"{low[v] - low['plain']:+.1f}" for v in extra]
        )
    c.table(
        "peak RSS growth during generate(), MiB"
        + (f" (min-max over {repeats} processes per cell; differences use the minimums)" if repeats > 1 else ""),
        ["new tokens", "states", *variants, *[f"{v} - plain" for v in extra]],
        rows,
    )


def writer_alone(tokens: int) -> None:
    """RSS of a capture writer fed decode-shaped messages (a 16-token prefill, then one token per forward, H=256,
    33 steps), sampled every tokens/8: what loopscope's storage side holds as a capture grows, without a model."""
    import os

    import numpy as np
    import torch

    from loopscope.storage import index, run_files
    from loopscope.storage.write import writer as w
    from loopscope.storage.write.buffers import HostBufferPool

    hidden, steps = MODEL["n_embd"], STEPS + 1
    with c.workdir() as work:
        path = os.path.join(work, "w.h5")
        index.create_index(path, header={"loops": ["core"]}, readout=None)
        pool = HostBufferPool(64 << 20)
        writer = w.CaptureWriter(run_files.RunFiles(path), pool)
        writer.put(w.OpenRuns([0], [{"call": "generate"}]))

        def forward(offset: int, n: int) -> None:
            ids = np.arange(offset, offset + n)[None]
            writer.put(w.Tokens([0], offset, ids, np.ones_like(ids, dtype=np.int8), ids, 0))
            slab = pool.acquire((1, 1, n, steps, hidden), torch.float32)
            slab.normal_()
            writer.put(w.State([0], "core", offset, 0, slab, steps, "float32"))
            writer.put(w.Steps([0], "core", offset, n, steps - 1))

        forward(0, 16)
        writer.drain()
        rss0 = c.proc_status_kb("VmRSS")
        rows = []
        for n in range(1, tokens + 1):
            forward(15 + n, 1)
            if n % max(tokens // 8, 1) == 0:
                writer.drain()
                rows.append(
                    [
                        n,
                        f"{n * steps * hidden * 4 / 2**20:.1f}",
                        f"{(c.proc_status_kb('VmRSS') - rss0) / 1024:+.1f}",
                        f"{writer.staging.held / 2**20:.1f}",
                    ]
                )
        writer.put(w.CloseRuns([0]))
        writer.close()
    c.table(
        f"the writer alone: RSS growth after a 16-token prefill, H={hidden}, {steps} states per token, MiB",
        ["tokens", "states written", "RSS growth", "chunks being assembled"],
        rows,
    )


if __name__ == "__main__":
    main()
