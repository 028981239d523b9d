"""Does the Dask analysis get faster with more workers on one machine?

    python benchmarks/analysis_scaling.py            # ~2 min
    python benchmarks/analysis_scaling.py --small    # ~20 s smoke run

A study is simulated as ``--files`` rank captures of real states (the n_embd=1024 reference model, 32 steps,
replayed through loopscope as in ``write_rate.py``), joined with ``loopscope merge``. Every measure of every token
of every run is then computed, best of ``--repeats``, by: the streamed single-process analysis (the baseline);
Dask on local threads with 1, 2 and 4 workers; and a ``dask.distributed`` LocalCluster on loopback with 1, 2 and
4 worker processes of one thread each (cluster start-up not timed). Throughput is MB/s of stored states, from a
warm page cache, so it measures the CPU side; the ratio column is against the same scheduler with one worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import numpy as np
import torch
from write_rate import Replay, record_states

import loopscope
from loopscope.analysis import distributed as dd
from loopscope.analysis import metrics
from loopscope.storage.merge import merge

WORKERS = (1, 2, 4)


def streamed(path: str) -> None:
    with loopscope.open(path) as cap:
        for run in cap.runs:
            metrics.token_metrics(run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~20 s smoke run")
    p.add_argument("--files", type=int, default=4, help="rank captures to merge (default 4)")
    p.add_argument("--runs", type=int, default=None, help="runs per file (default 2, --small 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens per run (default 512, --small 128)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--small 1)")
    p.add_argument("--block-mb", type=float, default=64, help="Dask block budget (MB of float64 work per block)")
    a = p.parse_args()
    runs = a.runs or (1 if a.small else 2)
    tokens = a.tokens or (128 if a.small else 512)
    repeats = a.repeats or (1 if a.small else 3)
    block_bytes = int(a.block_mb * 1e6)
    c.console.print(f"[bold]loopscope analysis scaling[/bold] - {c.machine_line()}, {os.cpu_count()} CPUs")
    states = record_states(tokens, min(64, tokens), a.steps)
    from distributed import LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)  # start/stop chatter of the clusters

    with c.workdir() as folder:
        ids = torch.zeros((1, tokens), dtype=torch.int64)
        sources = []
        for f in range(a.files):  # one capture per rank, each with ``runs`` prefill runs
            sources.append(os.path.join(folder, f"cap.rank{f:05d}.h5"))
            model = Replay([states])
            with loopscope.attach(model, sources[-1], loop="block", mode="w"), torch.no_grad():
                for _ in range(runs):
                    model(input_ids=ids)
        del states
        merged = os.path.join(folder, "study.h5")
        summary = merge(merged, sources)
        size = summary.state_bytes
        variants: dict[str, callable] = {"streamed, 1 process": lambda: streamed(merged)}
        for n in WORKERS:
            variants[f"dask threads, {n}"] = lambda n=n: dd.token_metrics(merged, workers=n, block_bytes=block_bytes)
        clusters = {}
        try:
            for n in WORKERS:
                clusters[n] = LocalCluster(
                    n_workers=n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=":0",
                    silence_logs=50,
                )
                variants[f"dask cluster, {n} proc"] = lambda n=n: dd.token_metrics(
                    merged, scheduler=clusters[n].scheduler_address, block_bytes=block_bytes
                )
            check = dd.token_metrics(merged, scheduler=clusters[WORKERS[-1]].scheduler_address, block_bytes=block_bytes)
            with loopscope.open(merged) as cap:
                expected = metrics.token_metrics(cap.runs[-1])
            assert np.allclose(check[-1].distance, expected.distance, equal_nan=True), "results differ"

            def timed(name: str) -> float:
                t0 = time.perf_counter()
                variants[name]()
                return time.perf_counter() - t0

            for name in variants:  # warm-up: page cache, imports, worker start
                timed(name)
            results = c.interleaved(list(variants), repeats, timed)
        finally:
            for cluster in clusters.values():
                cluster.close()
    best = {name: min(times) for name, times in results.items()}
    rows = []
    for name in variants:
        base = "dask threads, 1" if "threads" in name else "dask cluster, 1 proc" if "cluster" in name else name
        rows.append(
            [
                name,
                f"{best[name]:.3f}",
                f"{c.median(results[name]):.3f}",
                c.fmt_rate(size, best[name]),
                f"{best[base] / best[name]:.2f}",
                f"{best['streamed, 1 process'] / best[name]:.2f}",
            ]
        )
    c.table(
        f"{c.fmt_bytes(size)} of states: {a.files} merged rank files x {runs} run(s) x {tokens} tokens x "
        f"{a.steps + 1} states x H=1024 float32; warm page cache; best of {repeats}",
        ["analysis", "best s", "median s", "MB/s", "/ 1 worker", "/ streamed"],
        rows,
    )


if __name__ == "__main__":
    main()
