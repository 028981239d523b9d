"""What does recording every iteration cost a ``generate()`` call, against doing nothing and against the two
recorders people write by hand?

    python benchmarks/overhead.py            # ~3 min on 2 CPU cores
    python benchmarks/overhead.py --small    # ~20 s smoke run

Variants (same model, prompt, seed; greedy decoding; default init_scale, so s0 is random but seeded):

* plain         no hooks;
* loopscope     ``loopscope.attach(model, path, mode="w")`` ... ``close()`` (close waits for the last write);
* naive         a forward hook on ``transformer.core_block[-1]`` appending ``output.detach().cpu()`` to a list,
                then one h5py dataset written at the end;
* non_blocking  the same with ``.to("cpu", non_blocking=True)``.

On CPU, ``.cpu()`` and ``.to("cpu", non_blocking=True)`` return the model's own tensor without copying, so the two
hand-written baselines only differ on CUDA (``--device cuda``); on CPU they cost one list append per iteration plus
the write at the end, and keep every state alive until then (see memory.py).

Three sizes: ``tiny`` (tiny_config defaults, 8 steps, 256 new tokens), ``large`` (n_embd=1024, 8 heads,
intermediate 2816, 32 steps) and ``realistic`` (the GPU target's: n_embd=2048, 16 heads, intermediate 5632, 4 core
blocks, 32 steps, bfloat16 weights, 128 new tokens; ``--sizes realistic --device cuda``). The large model decodes at
~0.3 s per token on 2 CPU cores, so 256 new tokens would take ~80 s per run and ~16 min for the 12 timed runs; it
generates 32 new tokens by default instead (``--large-new-tokens``). Each variant gets a short warm-up run, then
``--repeats`` timed runs in rotating order; the table shows medians. "total" is what the user waits for:
attach/hooks + generate + close/final write; "min x plain" compares the fastest runs; "CPU" is the process's CPU
time over the same span (every thread: the model's, the hooks', loopscope's writer), far less sensitive than wall
time to other processes on the machine.
"""

from __future__ import annotations

import argparse

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import torch


def bench_size(name: str, size: dict, new_tokens: int, prompt_len: int, repeats: int, device: str, note: str):
    model = c.build_model(size["config"], device, dtype=size.get("dtype"))
    ids = c.prompt(model, prompt_len)
    steps = size["steps"]
    with c.workdir() as work:
        for v in c.VARIANTS:  # warm-up: first-call costs (allocator, h5py, hook paths) out of the timings
            c.run_variant(v, model, ids, steps, 2, work)
        results = c.interleaved(c.VARIANTS, repeats, lambda v: c.run_variant(v, model, ids, steps, new_tokens, work))

    plain = c.median(r.total_s for r in results["plain"])
    plain_cpu = c.median(r.cpu_s for r in results["plain"])
    rows = []
    for v in c.VARIANTS:
        rs = results[v]
        total = c.median(r.total_s for r in rs)
        spread = (max(r.total_s for r in rs) - min(r.total_s for r in rs)) / total
        nbytes = rs[0].bytes
        rows.append(
            [
                v,
                f"{c.median(r.generate_s for r in rs):.3f}",
                f"{total:.3f}",
                f"{total / plain:.3f}",
                f"±{100 * spread / 2:.0f}%",
                f"{min(r.total_s for r in rs) / min(r.total_s for r in results['plain']):.3f}",
                f"{c.median(r.cpu_s for r in rs):.3f}",
                f"{c.median(r.cpu_s for r in rs) / plain_cpu:.3f}",
                c.fmt_bytes(nbytes) if nbytes else "-",
                c.fmt_rate(nbytes, total),
            ]
        )
    outputs = [r.output for rs in results.values() for r in rs]
    same = all(torch.equal(outputs[0], o) for o in outputs)
    cfg = model.config
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    c.table(
        f"{name}: n_embd={cfg.n_embd}, {cfg.n_heads} heads, intermediate {cfg.intermediate_size}, "
        f"{cfg.n_layers_in_recurrent_block} core blocks, {steps} steps, {dtype}, on {device}, prompt {prompt_len} + "
        f"{new_tokens} new tokens{note}; median of {repeats}",
        [
            "variant",
            "generate s",
            "total s",
            "x plain",
            "spread",
            "min x plain",
            "CPU s",
            "CPU x plain",
            "states captured",
            "MB/s",
        ],
        rows,
        caption=f"greedy outputs identical across all runs: {'yes' if same else 'NO'}",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~20 s smoke run: fewer tokens, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 3, --small 1)")
    p.add_argument("--tiny-new-tokens", type=int, default=None, help="default 256 (--small 32)")
    p.add_argument("--large-new-tokens", type=int, default=None, help="default 32 (--small 4)")
    p.add_argument("--realistic-new-tokens", type=int, default=None, help="default 128 (--small 2)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length in tokens")
    p.add_argument("--sizes", default="tiny,large", help="comma-separated subset of: " + ",".join(c.SIZES))
    p.add_argument("--device", default="cpu", help="cpu or cuda (the CUDA path was not run for the README)")
    a = p.parse_args()
    repeats = a.repeats or (1 if a.small else 3)
    tokens = {
        "tiny": a.tiny_new_tokens or (32 if a.small else 256),
        "large": a.large_new_tokens or (4 if a.small else 32),
        "realistic": a.realistic_new_tokens or (2 if a.small else 128),
    }
    c.console.print(f"[bold]loopscope overhead[/bold] - {c.machine_line()}")
    for v in c.VARIANTS:
        c.console.print(f"  {v:13s} {c.VARIANT_NOTES[v]}")
    names = a.sizes.split(",")
    unknown = [n for n in names if n not in c.SIZES]
    if unknown:
        p.error(f"--sizes: unknown {', '.join(unknown)}; choose from {', '.join(c.SIZES)}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: torch {torch.__version__} sees no CUDA device")
    for name in names:
        note = " (256 requested; reduced for CPU run time)" if name == "large" and tokens[name] < 256 else ""
        bench_size(name, c.SIZES[name], tokens[name], a.prompt, repeats, a.device, note)


if __name__ == "__main__":
    main()
