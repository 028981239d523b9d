"""How fast can loopscope get states onto disk, against writing the same bytes the fastest ways there are?

    python benchmarks/write_rate.py            # ~45 s
    python benchmarks/write_rate.py --disk     # and every writer timed to the disk (fsync), ~1 min more
    python benchmarks/write_rate.py --small    # ~10 s smoke run

Why a replay: on a CPU the model computes far slower than any disk writes (the n_embd=1024 reference model
makes ~1 MB/s of states decoding, ~4 MB/s in prefill, on 2 cores), so timing a real generate() measures the model,
not the writer. On a GPU the balance flips and the writer's ceiling is what matters. So the states are real --
one prefill
of the reference model at n_embd=1024, 32 steps, recorded with a plain hook -- and are then *replayed* through a
looped module whose iterations cost nothing (``Replay`` below: block k returns the recorded s_k). loopscope
attaches to it with ``loop="block"`` and does all its real work: hook, copy into a host slab laid out in the
run's chunks, queue, writer thread, disk blocks reserved ahead, each whole chunk written straight from the slab,
run file rename. Two shapes:

* prefill  one forward of ``--tokens`` tokens: steps+1 writes of [tokens, H] each (big slabs);
* decode   ``--tokens`` forwards of one token inside one generate(): (steps+1) x tokens writes of [1, H]
           (what generate() produces after the prompt).

Baselines write the same number of bytes to the same directory, no fsync (both sides end in the page cache):
``np.ndarray.tofile`` (one write call), ``os.pwrite`` of the same bytes in chunk-sized pieces, the same pieces into
blocks allocated first (as loopscope reserves its run files' blocks: the fair raw control), and one h5py
contiguous dataset. Controls from this thread, with no hooks, queue or threads: "h5py whole chunks" writes
loopscope's chunks, already laid out in memory, with ``write_direct_chunk`` into reserved blocks (the ceiling of
loopscope's writer: the same calls, without the hook's copy); "h5py via chunk cache" writes one
``dataset[:, k] = slab`` per iteration through a 64 MiB chunk cache (the write path before whole-chunk staging);
"replay alone" runs the replayed model with nothing attached (the model side's own cost).
"loopscope prefill x8" records eight prefill runs in one capture: the sustained rate, with attach/close and the
first run's start-up spread over eight; "x64 of 64 tokens" records the same bytes as 64 short runs (what a run file
costs). ``--disk`` adds a table where the raw writes and those two captures each end with an fsync of every file
and directory they wrote, so the disk's own write-back is timed too. Rates use the best of ``--repeats``
interleaved runs (medians beside them).

A second table (skip with ``--no-codecs``) captures the prefill with each ``compression=`` filter, float32 and
bfloat16 states, and reports the run file's size on disk against the states' bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import os
import threading
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import h5py
import numpy as np
import torch
from torch import nn

import loopscope
from loopscope.storage.write import preallocate, writer

SUSTAINED = 8  # prefill runs per capture for the sustained rate
SHORT_RUNS = 8  # the sustained volume again in runs this many times shorter: what each run file costs


class _Block(nn.Module):
    def forward(self, x, k):
        return self.states[k]


class Replay(nn.Module):
    """A looped model whose iterations cost nothing: forward i replays recorded states [steps+1, 1, T, H]."""

    def __init__(self, forwards: list[torch.Tensor]):
        super().__init__()
        self.block = _Block()
        self.forwards = forwards
        self.calls = 0

    def forward(self, input_ids):
        states = self.forwards[self.calls % len(self.forwards)]
        self.calls += 1
        self.block.states = states
        x = states[0]  # s0: the block's input at its first call
        for k in range(1, states.shape[0]):
            x = self.block(x, k)
        return x

    def generate(self, input_ids, forwards: int):
        """One token per forward, like decoding: loopscope records all of it as one run."""
        for i in range(forwards):
            self(input_ids=input_ids[:, i : i + 1])


def random_states(steps: int, tokens: int, hidden: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Seeded random states [steps+1, 1, tokens, hidden] made on ``device``, for a :class:`Replay` of one prefill
    whose bytes, not their values, are what is measured."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.randn(steps + 1, 1, tokens, hidden, device=device, generator=g).to(dtype)


def record_states(tokens: int, record: int, steps: int) -> torch.Tensor:
    """Real states [steps+1, 1, tokens, H] of the n_embd=1024 reference model: one prefill of ``record`` tokens
    (s0 from the adapter's input, s_k from core_block[-1]), tiled along tokens up to ``tokens``."""
    model = c.build_model(c.SIZES["large"]["config"])
    hidden = model.config.n_embd
    seen: list[torch.Tensor] = []
    hooks = [
        model.transformer.adapter.register_forward_pre_hook(
            lambda m, args: None if seen else seen.append(args[0][..., :hidden].clone())
        ),
        model.transformer.core_block[-1].register_forward_hook(lambda m, args, out: seen.append(out.clone())),
    ]
    torch.manual_seed(0)
    with torch.no_grad():
        model(c.prompt(model, record), num_steps=steps)
    for h in hooks:
        h.remove()
    states = torch.stack(seen)  # [steps+1, 1, record, H]
    reps = -(-tokens // record)
    return states.repeat(1, 1, reps, 1)[:, :, :tokens].contiguous()


def capture(
    model: Replay, path: str, shape: str, ids: torch.Tensor, runs: int = 1, checksums: bool = True, **options
) -> None:
    with checksums_off(not checksums), loopscope.attach(model, path, loop="block", mode="w", **options):
        for _ in range(runs):
            replay(model, shape, ids)


@contextlib.contextmanager
def checksums_off(off: bool):
    """The capture builds its writer with Fletcher-32 on every chunk; off, only to measure what that costs."""
    if not off:
        yield
        return
    original = writer.CaptureWriter
    writer.CaptureWriter = functools.partial(original, checksums=False)
    try:
        yield
    finally:
        writer.CaptureWriter = original


def replay(model: Replay, shape: str, ids: torch.Tensor) -> None:
    if shape == "prefill":
        model(input_ids=ids)
    else:
        model.generate(ids, ids.shape[1])


def cached_writes(path: str, states: torch.Tensor, chunks) -> None:
    """The write path before whole-chunk staging: one write per iteration through a 64 MiB chunk cache."""
    steps1, _, tokens, hidden = states.shape
    arrays = states[:, 0].numpy()  # [steps+1, tokens, H]
    with h5py.File(path, "w", libver="latest", rdcc_nbytes=64 << 20, rdcc_w0=1.0) as f:
        ds = f.create_dataset("states", shape=(tokens, steps1, hidden), dtype=np.float32, chunks=chunks)
        for k in range(steps1):
            ds[:, k, :] = arrays[k]


def chunk_major(by_token: np.ndarray, chunks) -> np.ndarray:
    """[T, K, H] states rearranged chunk by chunk, [T/ct, K/ck, ct, ck, H] (padded with NaN to whole chunks)."""
    tokens, steps1, hidden = by_token.shape
    ct, ck, _ = chunks
    padded = np.full((-(-tokens // ct) * ct, -(-steps1 // ck) * ck, hidden), np.nan, dtype=by_token.dtype)
    padded[:tokens, :steps1] = by_token
    blocks = padded.reshape(padded.shape[0] // ct, ct, padded.shape[1] // ck, ck, hidden)
    return np.ascontiguousarray(blocks.transpose(0, 2, 1, 3, 4))


def whole_chunks(path: str, blocks: np.ndarray, shape, chunks) -> None:
    """loopscope's writer without the pipeline: every chunk already laid out in memory (as the hooks' slabs lay
    them out), disk blocks reserved ahead, each chunk written once with ``write_direct_chunk``."""
    ct, ck, _ = chunks
    with h5py.File(path, "w", libver="latest", rdcc_nbytes=0) as f:
        ds = f.create_dataset("states", shape=shape, dtype=blocks.dtype, chunks=chunks)
        reserve = preallocate.Reserve(path)
        for ti in range(blocks.shape[0]):
            reserve.ahead(blocks[ti].nbytes)
            for ki in range(blocks.shape[1]):
                ds.id.write_direct_chunk((ti * ct, ki * ck, 0), blocks[ti, ki])
    reserve.release()


def pieces(path: str, flat: np.ndarray, piece: int, reserve: bool = False, copies: int = 1) -> None:
    """A raw sequential write of the same bytes in chunk-sized pieces (a chunked file cannot be one write call),
    ``copies`` times over; ``reserve``: the file's blocks are allocated first, as loopscope reserves its run files'."""
    view = memoryview(flat).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        if reserve:
            os.posix_fallocate(fd, 0, len(view) * copies)
        for copy in range(copies):
            for start in range(0, len(view), piece):
                os.pwrite(fd, view[start : start + piece], copy * len(view) + start)
    finally:
        os.close(fd)


def synced(fn, work: str):
    """``fn`` followed by an fsync of every file it left in ``work`` and of the directories: the bytes are on the
    disk when it returns, not only in the page cache."""

    def run():
        fn()
        for root, _, files in os.walk(work):
            for name in [*files, "."]:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    return run


def copy_ceiling(nbytes: int, repeats: int) -> tuple[float, float]:
    """Memory copy rate of one thread, and of two threads copying at once (numpy releases the GIL), in bytes/s.

    A capture copies every byte twice, at the same time on two threads: the hook out of the model's tensor into a
    slab, the writer from the slab into the page cache. A raw write copies once. Where two copies at once run no
    faster than one, memory bandwidth caps a capture near ``dual / single / 2`` of the raw write, whatever it does.
    """
    pairs = [(np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)) for _ in range(2)]
    for src, dst in pairs:
        np.copyto(dst, src)

    def copy(src, dst):
        for _ in range(repeats):
            np.copyto(dst, src)

    t = time.perf_counter()
    copy(*pairs[0])
    single = repeats * nbytes / (time.perf_counter() - t)
    threads = [threading.Thread(target=copy, args=pair) for pair in pairs]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dual = 2 * repeats * nbytes / (time.perf_counter() - t)
    return single, dual


def rate_table(times: dict, nbytes: int, volume: dict, raws: list[str], title: str, caption: str) -> None:
    """One row per case: best and median time, MB/s, and the rate against each of the ``raws`` cases."""
    # Best of N: a 10 ms raw write is at the mercy of the kernel's background work on this VM (one in three took
    # 0.15 s), and the question is each writer's speed, not the machine's hiccups. Medians are shown too.
    rate = {name: nbytes * volume.get(name, 1) / min(ts) for name, ts in times.items()}
    rows = [
        [
            name,
            f"{min(ts):.3f}",
            f"{c.median(ts):.3f}",
            f"{rate[name] / c.MB:,.0f}",
            *[f"{rate[name] / rate[raw]:.3f}" for raw in raws],
        ]
        for name, ts in times.items()
    ]
    c.table(title, ["writer", "best s", "median s", "MB/s", *[f"/ {raw}" for raw in raws]], rows, caption=caption)


OFF = "no checksums: loopscope "  # the same captures with Fletcher-32 off (CaptureWriter(checksums=False))


def checksum_table(times: dict, nbytes: int, volume: dict, sustained: str) -> None:
    """Write rate with Fletcher-32 on every chunk (the default) against the same capture without it."""
    rows = []
    for on, off in (
        ("loopscope prefill", f"{OFF}prefill"),
        ("loopscope decode", f"{OFF}decode"),
        (sustained, f"{OFF}prefill x{SUSTAINED}"),
    ):
        rate_on = nbytes * volume.get(on, 1) / min(times[on])
        rate_off = nbytes * volume.get(off, 1) / min(times[off])
        rows.append(
            [
                on.removeprefix("loopscope "),
                f"{rate_on / c.MB:,.0f}",
                f"{rate_off / c.MB:,.0f}",
                f"{rate_on / rate_off:.3f}",
            ]
        )
    c.table(
        "checksums: Fletcher-32 on every chunk (default) / off, same run",
        ["capture", "MB/s on", "MB/s off", "on / off"],
        rows,
        caption="best of the interleaved repeats above",
    )


def codec_table(states: torch.Tensor, ids: torch.Tensor, work: str, repeats: int) -> None:
    """Bytes on disk and write rate of a prefill capture with each filter, float32 and bfloat16 states."""
    from loopscope.storage import compression

    try:
        compression.plugin("the codec table")
        codecs = [None, *compression.NAMES]
    except loopscope.LoopscopeError:
        c.console.print("[yellow]hdf5plugin is not installed: plugin filters skipped[/yellow]")
        codecs = [None, "gzip", "lzf"]
    model = Replay([states])
    nbytes = states.numel() * states.element_size()
    path = os.path.join(work, "codec.h5")
    rows = []
    for dtype in ("float32", "bfloat16"):
        logical = nbytes // (2 if dtype == "bfloat16" else 1)
        for codec in codecs:
            times = []
            for _ in range(repeats):
                t = time.perf_counter()
                capture(model, path, "prefill", ids, compression=codec, dtype=dtype)
                times.append(time.perf_counter() - t)
                on_disk = sum(os.path.getsize(p) for p in glob.glob(path + ".runs/*.h5"))
                c.clear_dir(work)
            rows.append(
                [
                    dtype,
                    codec or "none",
                    c.fmt_bytes(on_disk),
                    f"{logical / on_disk:.3f}",
                    f"{logical / min(times) / c.MB:,.0f}",
                    f"{logical / c.median(times) / c.MB:,.0f}",
                ]
            )
    c.table(
        f"compression: one prefill of the {ids.shape[1]} recorded tokens (not tiled), {c.fmt_bytes(nbytes)} of "
        f"float32 states; best of {repeats}",
        ["states", "compression", "run file", "states / file", "MB/s best", "MB/s median"],
        rows,
        caption="MB/s of the states' own bytes (bfloat16: half of float32's); attach ... close, end in the page cache",
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~10 s smoke run")
    p.add_argument("--tokens", type=int, default=None, help="tokens replayed per shape (default 512, --small 64)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--record", type=int, default=None, help="prefill length actually computed (default 64)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (--small 1)")
    p.add_argument("--no-codecs", action="store_true", help="skip the compression table")
    p.add_argument("--disk", action="store_true", help="also time every writer to the disk (fsync), ~1 min more")
    a = p.parse_args()
    tokens = a.tokens or (64 if a.small else 512)
    record = a.record or (16 if a.small else 64)
    repeats = a.repeats or (1 if a.small else 5)
    c.console.print(f"[bold]loopscope write rate[/bold] - {c.machine_line()}")

    t0 = time.perf_counter()
    states = record_states(tokens, min(record, tokens), a.steps)
    steps1, _, _, hidden = states.shape
    nbytes = states.numel() * states.element_size()
    c.console.print(
        f"recorded {record} prefill tokens of the n_embd={hidden} reference model at {a.steps} steps in "
        f"{time.perf_counter() - t0:.1f} s; replaying {tokens} tokens x {steps1} states x {hidden} float32 = "
        f"{c.fmt_bytes(nbytes)} per run"
    )
    prefill_model = Replay([states])
    decode_model = Replay([states[:, :, t : t + 1] for t in range(tokens)])
    short = max(tokens // SHORT_RUNS, 1)  # the same bytes as x8 again, in many short runs (per-run costs)
    short_model = Replay([states[:, :, :short].contiguous()])
    ids = torch.arange(tokens).remainder(256).unsqueeze(0)
    flat = states.numpy().reshape(-1)
    sustained = f"loopscope prefill x{SUSTAINED}"
    short_name = f"loopscope prefill x{SUSTAINED * SHORT_RUNS} of {short} tokens"
    volume = {sustained: SUSTAINED, short_name: SUSTAINED, f"{OFF}prefill x{SUSTAINED}": SUSTAINED}

    with c.workdir() as work:
        path = os.path.join(work, "run.h5")
        capture(prefill_model, path, "prefill", ids)  # warm-up, and the chunk shape loopscope picks
        with loopscope.open(path) as f:
            chunks = f.runs[0].dataset().chunks
            written = c.states_bytes(path)
        assert written == nbytes, (written, nbytes)
        c.clear_dir(work)
        by_token = np.ascontiguousarray(states[:, 0].numpy().transpose(1, 0, 2))  # [tokens, steps+1, H]
        blocks = chunk_major(by_token, chunks)
        piece = int(np.prod(chunks)) * 4

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            c.clear_dir(work)
            return dt

        cases = {
            "tofile": lambda: flat.tofile(path),
            "pwrite, chunk-sized pieces": lambda: pieces(path, flat, piece),
            "pwrite pieces, reserved blocks": lambda: pieces(path, flat, piece, reserve=True),
            "h5py contiguous": lambda: h5py.File(path, "w").create_dataset("states", data=flat).file.close(),
            "loopscope prefill": lambda: capture(prefill_model, path, "prefill", ids),
            "loopscope decode": lambda: capture(decode_model, path, "decode", ids),
            sustained: lambda: capture(prefill_model, path, "prefill", ids, runs=SUSTAINED),
            f"{OFF}prefill": lambda: capture(prefill_model, path, "prefill", ids, checksums=False),
            f"{OFF}decode": lambda: capture(decode_model, path, "decode", ids, checksums=False),
            f"{OFF}prefill x{SUSTAINED}": lambda: capture(
                prefill_model, path, "prefill", ids, runs=SUSTAINED, checksums=False
            ),
            short_name: lambda: capture(short_model, path, "prefill", ids[:, :short], runs=SUSTAINED * SHORT_RUNS),
            "h5py whole chunks": lambda: whole_chunks(path, blocks, by_token.shape, chunks),
            "h5py via chunk cache": lambda: cached_writes(path, states, chunks),
            "replay alone: prefill": lambda: replay(prefill_model, "prefill", ids),
            "replay alone: decode": lambda: replay(decode_model, "decode", ids),
        }
        for fn in cases.values():
            timed(fn)
        times = c.interleaved(list(cases), repeats, lambda name: timed(cases[name]))
        rate_table(
            times,
            nbytes,
            volume,
            ["tofile", "pwrite pieces, reserved blocks"],
            f"{c.fmt_bytes(nbytes)} per run ({tokens} tokens x {steps1} states x H={hidden}, float32), loopscope's "
            f"chunks {chunks}; best of {repeats}",
            f"writes end in the page cache (no fsync); decode = one forward per token, as in generate(); "
            f"x{SUSTAINED} = {SUSTAINED} prefill runs in one capture (sustained rate); x{SUSTAINED * SHORT_RUNS}: the "
            f"same bytes in {short}-token runs (one run file each)",
        )

        checksum_table(times, nbytes, volume, sustained)

        single, dual = copy_ceiling(nbytes, 8)
        c.console.print(
            f"memory copies: one thread {single / 1e9:.1f} GB/s, two at once {dual / 1e9:.1f} GB/s together "
            f"({dual / single:.2f}x); a capture copies each byte twice at once, so memory bandwidth caps it near "
            f"{dual / single / 2:.2f} of a raw write to the page cache"
        )

        if a.disk:
            # Every case writes the x8 volume and ends with an fsync of all it wrote: the rate of the disk itself.
            copies = SUSTAINED
            disk = {
                "raw write + fsync": lambda: pieces(path, flat, flat.nbytes, copies=copies),
                "pwrite pieces, reserved + fsync": lambda: pieces(path, flat, piece, reserve=True, copies=copies),
                f"{sustained} + fsync": lambda: capture(prefill_model, path, "prefill", ids, runs=copies),
                f"{short_name} + fsync": lambda: capture(
                    short_model, path, "prefill", ids[:, :short], runs=copies * SHORT_RUNS
                ),
            }
            disk = {name: synced(fn, work) for name, fn in disk.items()}
            os.sync()
            disk_times = c.interleaved(list(disk), repeats, lambda name: timed(disk[name]))
            rate_table(
                disk_times,
                nbytes,
                dict.fromkeys(disk, copies),
                ["raw write + fsync", "pwrite pieces, reserved + fsync"],
                f"to the disk: {c.fmt_bytes(nbytes * copies)} per case, each ending with an fsync of every file and "
                f"directory it wrote; best of {repeats}",
                "the time includes the disk's own write-back, so the page cache no longer hides it",
            )
    if not a.no_codecs:
        with c.workdir() as work:
            # the recorded tokens only: tiled copies would hand the compressors repeats real states never have
            real = min(record, tokens)
            codec_table(states[:, :, :real].contiguous(), ids[:, :real], work, max(1, repeats // 2))


if __name__ == "__main__":
    main()
