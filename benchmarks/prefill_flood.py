"""When states arrive faster than the disk takes them: back-pressure, bounded host memory, and what ``dtype=``,
``step_stride=`` and ``tokens=`` buy.

    python benchmarks/prefill_flood.py                 # ~1 min on 2 CPU cores
    python benchmarks/prefill_flood.py --device cuda   # on a GPU: states on the device, bfloat16, H=5280
    python benchmarks/prefill_flood.py --small         # ~10 s smoke run

The model is ``write_rate.Replay``, a looped module whose iterations cost nothing: it replays states of a real
shape, so they arrive as fast as the hooks take them and the capture is bound by the writer and the disk. That is
the case of a large model prefilling on a fast GPU. Each capture attaches once, runs ``--forwards`` prefills of
``--tokens`` tokens (``--steps`` iterations, width ``--hidden``) and closes. The variants store parts of the same
states:

* full              every state as computed;
* dtype=bfloat16    cast on the model's device (half the bytes of float32 states; left out when they are 16-bit);
* step_stride=4     s0, every 4th iteration and each token's last;
* every 8th token   ``tokens=range(0, T, 8)``, selected on the model's device.

Columns:
* s / model s: until ``close()`` returned (every state in its run file) / until the last forward returned;
* MB/s: the stored bytes over the first;
* waits / wait s: how often, and how long, the hooks waited for a free slab (back-pressure, ``pool.stats``);
* pool peak: the slabs in use at most, against the ``--buffer-mb`` budget;
* staging peak: the chunks the writer assembled at most (bounded by half the budget);
* RSS peak: the process's peak resident memory during the capture over its resident memory before (Linux VmHWM,
  reset before each capture; pinned slabs count).
``plain`` is the forwards alone (replayed: next to nothing). Medians of ``--repeats`` for the times; the largest of
each peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import torch
from write_rate import Replay, random_states

import loopscope


def variants(tokens: int, dtype: torch.dtype) -> dict[str, dict | None]:
    """attach() options per variant (None: no capture)."""
    cases: dict[str, dict | None] = {"plain": None, "full": {}}
    if dtype == torch.float32:
        cases["dtype=bfloat16"] = {"dtype": "bfloat16"}
    cases["step_stride=4"] = {"step_stride": 4}
    cases["every 8th token"] = {"tokens": range(0, tokens, 8)}
    return cases


def run(model: Replay, ids: torch.Tensor, forwards: int, path: str, options: dict | None, buffer_mb: float) -> dict:
    """One capture (or the plain forwards): its times, what it stored, and the pool's and the process's peaks."""
    device = str(ids.device)
    peak_known = c.reset_peak_rss()
    rss0 = c.proc_status_kb("VmRSS")
    c.sync(device)
    t0 = time.perf_counter()
    capture = (
        None
        if options is None
        else loopscope.attach(model, path, loop="block", mode="w", buffer_mb=buffer_mb, **options)
    )
    with torch.no_grad():
        for _ in range(forwards):
            model(input_ids=ids)
    c.sync(device)
    model_s = time.perf_counter() - t0
    if capture is not None:
        capture.close()
    total_s = time.perf_counter() - t0
    result = {
        "s": total_s,
        "model_s": model_s,
        "rss_peak": (c.proc_status_kb("VmHWM") - rss0) * 1024 if peak_known else float("nan"),
    }
    if capture is not None:
        stats = capture.pool.stats
        result |= {
            "bytes": c.states_bytes(path),
            "waits": stats.waits,
            "wait_s": stats.wait_seconds,
            "pool_peak": stats.peak_bytes,
            "staging_peak": capture.writer.staging.peak,
        }
    c.clear_dir(os.path.dirname(path))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="smoke run: 2 forwards of 128 tokens, H=256, one repeat")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--forwards", type=int, default=None, help="prefills per capture (default 8, cuda 4, --small 2)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per prefill (default 512, cuda 2048)")
    p.add_argument("--hidden", type=int, default=None, help="state width (default 1024, cuda 5280 as Huginn-0125)")
    p.add_argument("--steps", type=int, default=32, help="iterations per token (s0 is stored too)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default float32, cuda bfloat16"
    )
    p.add_argument("--buffer-mb", type=float, default=64, help="attach(buffer_mb=): the host budget for slabs")
    p.add_argument("--repeats", type=int, default=None, help="captures per variant (default 3, --small 1)")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device; none is visible here (torch.cuda.is_available() is False)")
    forwards = a.forwards or (2 if a.small else 4 if cuda else 8)
    tokens = a.tokens or (128 if a.small else 2048 if cuda else 512)
    hidden = a.hidden or (256 if a.small else 5280 if cuda else 1024)
    dtype = getattr(torch, a.dtype or ("bfloat16" if cuda else "float32"))
    repeats = a.repeats or (1 if a.small else 3)

    states = random_states(a.steps, tokens, hidden, a.device, dtype)
    model = Replay([states])
    ids = torch.zeros(1, tokens, dtype=torch.long, device=a.device)
    per_capture = forwards * states.numel() * states.element_size()
    c.console.print(f"[bold]loopscope prefill flood[/bold] - {c.machine_line()}")
    c.console.print(
        f"{forwards} forwards of {tokens} tokens, H={hidden}, s0 + {a.steps} iterations, "
        f"{str(dtype).removeprefix('torch.')}: "
        f"{c.fmt_bytes(per_capture)} of states per capture; buffer_mb={a.buffer_mb:g}; {repeats} repeat(s)"
    )
    cases = variants(tokens, dtype)
    with c.workdir() as work:
        path = os.path.join(work, "flood.h5")
        run(model, ids, 1, path, {}, a.buffer_mb)  # warm-up: first-call costs out of the timings
        results = c.interleaved(list(cases), repeats, lambda v: run(model, ids, forwards, path, cases[v], a.buffer_mb))

    rows = []
    for name, rs in results.items():
        s = statistics.median(r["s"] for r in rs)
        row = [name, f"{s:.3f}", f"{statistics.median(r['model_s'] for r in rs):.3f}"]
        if name == "plain":
            rows.append(row + ["-"] * 6 + [c.fmt_bytes(max(r["rss_peak"] for r in rs))])
            continue
        stored = rs[0]["bytes"]
        rows.append(
            row
            + [
                c.fmt_bytes(stored),
                c.fmt_rate(stored, s),
                f"{max(r['waits'] for r in rs)}",
                f"{max(r['wait_s'] for r in rs):.2f}",
                c.fmt_bytes(max(r["pool_peak"] for r in rs)),
                c.fmt_bytes(max(r["staging_peak"] for r in rs)),
                c.fmt_bytes(max(r["rss_peak"] for r in rs)),
            ]
        )
    c.table(
        "prefill faster than the writer",
        [
            "variant",
            "s",
            "model s",
            "stored",
            "MB/s",
            "waits",
            "wait s",
            "pool peak",
            "staging peak",
            "RSS peak",
        ],
        rows,
        caption=f"pool budget {a.buffer_mb:g} MiB; staging bounded by half of it",
    )


if __name__ == "__main__":
    main()
