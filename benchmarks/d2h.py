"""How fast does loopscope move states off the GPU, against the fastest device-to-host copy there is?

    python benchmarks/d2h.py            # needs a CUDA device; about 1 min on one H200
    python benchmarks/d2h.py --small    # smoke run, a few seconds
    python benchmarks/d2h.py --small --device cpu   # the script's own check on a machine without a GPU

States have the shape of Huginn-0125's: H=5280 in bfloat16, s0 plus 32 iterations. They are made on the device once
and replayed through a looped module whose iterations cost nothing (``write_rate.Replay``, here with device-resident
states), so the figures time the copy path, not a model. Two shapes: a prefill (one forward of ``--tokens``
tokens) and a decode (``--decode`` one-token forwards inside one generate()). Variants, each the same bytes:

* pinned copy     every state copied with ``non_blocking=True`` into one reused pinned host buffer, one
                  synchronisation at the end: the device-to-host ceiling (the target is >= 80 % of it);
* .cpu() per state  what a hand-written hook does: a blocking copy into new pageable memory per state;
* loopscope D2H   ``attach(loop="block")`` with the writer reduced to waiting for each slab's copy event and
                  handing the slab back (no file): the hook, the gather of a plane on the device, the side-stream
                  copy into pinned slabs and the events, alone;
* loopscope D2H, 1 GiB budget  the same with ``buffer_mb=1024`` (a prefill plane then fits one slab; with the
                  default 64 MiB budget a 2048-token plane of H=5280 is split into token blocks);
* loopscope to file  the real writer too, into the page cache (bounded by the host's write rate, not the copy).

Times run from the first forward until ``flush()`` returns (every copy waited for; the run file complete).
Best of ``--repeats``, medians
beside. On a machine without CUDA the script says so and exits; ``--device cpu`` runs the same cases on the CPU
(host-to-host copies, no pinning: a check of the script, not a device-to-host figure).
"""

from __future__ import annotations

import argparse
import os
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import torch
from write_rate import Replay, random_states, rate_table

import loopscope


def pinned_copy(states: torch.Tensor, host: torch.Tensor) -> None:
    for k in range(states.shape[0]):
        host[k].copy_(states[k], non_blocking=True)
    c.sync(str(states.device))


def pageable_copy(states: torch.Tensor) -> None:
    kept = [states[k].cpu() for k in range(states.shape[0])]
    del kept


def capture(model: Replay, path: str, ids: torch.Tensor, decode: bool, file: bool, **options) -> float:
    """Seconds from the first forward until every state is off the device (and, with ``file``, in its run file);
    attach and close, which create and finish the index file once per capture, are left out."""
    cap = loopscope.attach(model, path, loop="block", mode="w", **options)
    if not file:

        def wait_only(message) -> None:  # the slab goes back to the pool in the writer loop's finally
            for event in message.ready or ():
                event.synchronize()

        cap.writer._write_state = wait_only
    c.sync(str(ids.device))
    t = time.perf_counter()
    try:
        if decode:
            model.generate(ids, ids.shape[1])
        else:
            model(input_ids=ids)
        cap.flush()  # every slab waited for (and written, with the file): the run is complete on disk
        elapsed = time.perf_counter() - t
    finally:
        cap.close()  # links the run into the index: a fixed cost per capture, left out
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="smoke run: fewer tokens, one repeat")
    p.add_argument("--tokens", type=int, default=None, help="prefill tokens (default 2048, --small 256)")
    p.add_argument("--decode", type=int, default=None, help="decoded tokens (default 256, --small 16)")
    p.add_argument("--hidden", type=int, default=5280)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--repeats", type=int, default=None, help="default 5 (--small 1)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a check of the script itself)")
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("needs a CUDA device; none is visible here (torch.cuda.is_available() is False)")
    tokens = a.tokens or (256 if a.small else 2048)
    decode = a.decode or (16 if a.small else 256)
    repeats = a.repeats or (1 if a.small else 5)
    dtype = getattr(torch, a.dtype)
    c.console.print(f"[bold]loopscope device-to-host[/bold] - {c.machine_line()}")

    device = a.device
    prefill_states = random_states(a.steps, tokens, a.hidden, device, dtype)
    decode_states = [prefill_states[:, :, t : t + 1] for t in range(decode)]
    shapes = {
        f"prefill, {tokens} tokens": (Replay([prefill_states]), prefill_states, False),
        f"decode, {decode} tokens": (Replay(decode_states), prefill_states[:, :, :decode], True),
    }
    host = torch.empty_like(prefill_states, device="cpu")
    host = host.pin_memory() if device.startswith("cuda") else host
    with c.workdir() as work:
        path = os.path.join(work, "d2h.h5")
        for shape, (model, states, is_decode) in shapes.items():
            ids = torch.zeros(1, states.shape[2], dtype=torch.long, device=device)
            nbytes = states.numel() * states.element_size()
            if is_decode:  # the ceiling for one token's states at a time: as many small copies as decoding makes

                def pinned():
                    for t in range(states.shape[2]):
                        pinned_copy(states[:, :, t : t + 1], host[:, :, t : t + 1])

                def pageable():
                    for t in range(states.shape[2]):
                        pageable_copy(states[:, :, t : t + 1])
            else:

                def pinned():
                    pinned_copy(states, host)

                def pageable():
                    pageable_copy(states)

            cases = {
                "pinned copy": pinned,
                ".cpu() per state": pageable,
                "loopscope D2H": lambda: capture(model, path, ids, is_decode, file=False),
                "loopscope D2H, 1 GiB budget": lambda: capture(model, path, ids, is_decode, file=False, buffer_mb=1024),
                "loopscope to file": lambda: capture(model, path, ids, is_decode, file=True),
            }

            def timed(name: str) -> float:
                c.sync(device)
                t = time.perf_counter()
                own = cases[name]()  # a capture times itself, from its first forward
                dt = time.perf_counter() - t if own is None else own
                c.clear_dir(work)
                return dt

            for name in cases:  # warm-up: allocator, pinned pool, CUDA streams, h5py
                timed(name)
            times = c.interleaved(list(cases), repeats, timed)
            rate_table(
                times,
                nbytes,
                {},
                ["pinned copy"],
                f"{shape}: {a.steps + 1} states x H={a.hidden} {a.dtype} = {c.fmt_bytes(nbytes)}; best of {repeats}",
                "from the first forward until every copy is done (loopscope: until flush() returns)",
            )


if __name__ == "__main__":
    main()
