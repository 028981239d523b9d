"""How fast does the offline analysis read a capture, against reading the same file's bytes sequentially?

    python benchmarks/analysis_rate.py            # ~1 min
    python benchmarks/analysis_rate.py --small    # ~10 s smoke run
    python benchmarks/analysis_rate.py --readout  # measures in the readout space (an RMSNorm, as Huginn's ln_f)

The capture is made of real states (the n_embd=1024 reference model, 32 steps, replayed through loopscope as in
``write_rate.py``) in one prefill-shaped run. Four readers go over the run's file, best of ``--repeats``:

* raw read          ``open().readinto`` of the whole run file in 8 MB blocks (the ceiling);
* h5py blocks       ``Run.read`` of every token block the analysis reads, into one buffer, no arithmetic (the
                    storage cost);
* token_metrics     the full streamed analysis: every measure of every token and step, in the state space (the
                    replayed model has no final norm), or with ``--readout`` in the readout space;
* convergence       the distances alone (``metrics.convergence``, what the convergence heatmap draws).

``--cold`` drops the file from the page cache before each read (``posix_fadvise(DONTNEED)`` after an fsync), so
reads come from the disk; without it every reader works from memory, which measures CPU cost only.
The design's target: the convergence analysis >= 50 % of the raw read.
"""

from __future__ import annotations

import argparse
import os
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import h5py
import numpy as np
from write_rate import Replay, capture, record_states

import loopscope
from loopscope.analysis import metrics
from loopscope.analysis.reference import resolve_space
from loopscope.storage import schema


def drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: str) -> None:
    buffer = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def store_rmsnorm(path: str, hidden: int) -> None:
    """Give the capture an RMSNorm readout (weights drawn once): the replayed model has no final norm to record."""
    with h5py.File(path, "r+") as f:
        group = f[schema.READOUT]
        group.attrs.update({"kind": schema.text("rmsnorm"), "eps": 1e-6, "weight_offset": 0.0})
        weight = np.random.default_rng(0).uniform(0.5, 1.5, hidden).astype(np.float32)
        group.create_dataset("weight", data=weight)


def h5py_blocks(run) -> None:
    ds = run.dataset()
    block = metrics._token_block(ds.shape[1], ds.shape[2], metrics.BLOCK_BYTES, ds.chunks)
    buffer = np.empty((min(block, ds.shape[0]), *ds.shape[1:]), ds.dtype)  # reused, as the analysis reads
    for t0 in range(0, ds.shape[0], block):
        t1 = min(t0 + block, ds.shape[0])
        run.read(np.s_[t0:t1], out=buffer[: t1 - t0])


OFF = "no checksums: "


def hdf5_checked_blocks(run) -> None:
    """The same block reads through HDF5's own pipeline, which checks Fletcher-32 itself (the slower way)."""
    ds = run.dataset()
    block = metrics._token_block(ds.shape[1], ds.shape[2], metrics.BLOCK_BYTES, ds.chunks)
    buffer = np.empty((min(block, ds.shape[0]), *ds.shape[1:]), ds.dtype)
    for t0 in range(0, ds.shape[0], block):
        t1 = min(t0 + block, ds.shape[0])
        ds.read_direct(buffer[: t1 - t0], np.s_[t0:t1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~10 s smoke run")
    p.add_argument("--tokens", type=int, default=None, help="tokens in the run (default 2048, --small 128)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (--small 1)")
    p.add_argument("--cold", action="store_true", help="drop the file from the page cache before each read")
    p.add_argument("--readout", action="store_true", help="measure in the readout space (a stored RMSNorm)")
    a = p.parse_args()
    tokens = a.tokens or (128 if a.small else 2048)
    repeats = a.repeats or (1 if a.small else 3)
    c.console.print(f"[bold]loopscope analysis read rate[/bold] - {c.machine_line()}")
    states = record_states(tokens, min(64, tokens), a.steps)
    with c.workdir() as folder:
        path = os.path.join(folder, "analysis.h5")
        ids = np.zeros((1, tokens), dtype=np.int64)
        import torch

        plain = os.path.join(folder, "unchecked.h5")  # the same capture without checksums, to price them
        capture(Replay([states]), path, "prefill", torch.from_numpy(ids))
        capture(Replay([states]), plain, "prefill", torch.from_numpy(ids), checksums=False)
        if a.readout:
            store_rmsnorm(path, states.shape[-1])
            store_rmsnorm(plain, states.shape[-1])
        del states
        with loopscope.open(path) as cap, loopscope.open(plain) as cap_off:
            run, run_off = cap.runs[0], cap_off.runs[0]
            size = os.path.getsize(run.path)
            readers = {
                "raw read": lambda: raw_read(run.path),
                "h5py blocks": lambda: h5py_blocks(run),
                "h5py blocks, HDF5 checks": lambda: hdf5_checked_blocks(run),
                "token_metrics": lambda: metrics.token_metrics(run),
                "convergence": lambda: metrics.convergence(run),
                f"{OFF}h5py blocks": lambda: h5py_blocks(run_off),
                f"{OFF}token_metrics": lambda: metrics.token_metrics(run_off),
                f"{OFF}convergence": lambda: metrics.convergence(run_off),
            }

            def timed(name: str) -> float:
                target = run_off if name.startswith(OFF) else run
                if a.cold:
                    target.close()
                    drop_from_cache(target.path)
                t0 = time.perf_counter()
                readers[name]()
                return time.perf_counter() - t0

            results = c.interleaved(list(readers), repeats, timed)
            shape = run.dataset().shape
            chunks = run.dataset().chunks
            space = resolve_space(run, "auto")
        best = {name: min(times) for name, times in results.items()}
        rows = [
            [
                name,
                f"{best[name]:.3f}",
                f"{c.median(results[name]):.3f}",
                c.fmt_rate(size, best[name]),
                f"{best['raw read'] / best[name]:.3f}",
            ]
            for name in readers
        ]
        c.table(
            f"{c.fmt_bytes(size)} run file: {shape[0]} tokens x {shape[1]} states x H={shape[2]} float32, "
            f"chunks {chunks}; {space} space; "
            f"{'cold (page cache dropped)' if a.cold else 'warm page cache'}; best of {repeats}",
            ["reader", "best s", "median s", "MB/s", "/ raw read"],
            rows,
            caption="target: the analysis >= 0.5 of the raw read. Every chunk's Fletcher-32 is checked on read: by "
            "loopscope (raw chunk + numpy) for the streamed token blocks, by HDF5's pipeline for 'HDF5 checks'; "
            f"'{OFF.strip()}' rows read the same capture written without checksums",
        )
        rows = [
            [
                name,
                c.fmt_rate(size, best[name]),
                c.fmt_rate(size, best[OFF + name]),
                f"{best[OFF + name] / best[name]:.3f}",
            ]
            for name in ("h5py blocks", "token_metrics", "convergence")
        ]
        c.table(
            "checksums: read rate with every chunk checked / the same capture without checksums",
            ["reader", "MB/s checked", "MB/s unchecked", "checked / unchecked"],
            rows,
        )


if __name__ == "__main__":
    main()
