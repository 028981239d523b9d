"""Helpers shared by the benchmark scripts: environment, models, capture variants, timing, tables.

Every script imports this module *before* torch, because of the first block below.

Why ``OMP_WAIT_POLICY=PASSIVE``: on the 2-vCPU VM these figures were taken on, libgomp's default wait policy
(spin, then sleep) made two-thread CPU inference up to 20x slower for the first ~10-60 s of a process, then fast,
at random; the drift swamped every ratio. PASSIVE (sleep at once) is steady and no slower here. An explicit
``OMP_WAIT_POLICY`` in the environment wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import contextlib  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import h5py  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import loopscope  # noqa: E402
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config  # noqa: E402

console = Console(width=120)

MB = 1e6

# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

#: Model shapes used by the scripts (tiny_config overrides); ``steps`` is the ``num_steps`` passed to generate,
#: ``dtype`` the weights' (float32 if absent). ``realistic`` is the GPU target's size (issue: n_embd >= 2048, bf16,
#: 32+ steps), with Huginn-0125's 4 core blocks; on 2 CPU cores it decodes at seconds per token.
SIZES: dict[str, dict] = {
    "tiny": dict(config={}, steps=8),  # tiny_config defaults: E=64, 4 heads, 2 core blocks, 8 steps
    "large": dict(config=dict(n_embd=1024, num_attention_heads=8, intermediate_size=2816), steps=32),
    "realistic": dict(
        config=dict(n_embd=2048, num_attention_heads=16, intermediate_size=5632, n_layers_in_recurrent_block=4),
        steps=32,
        dtype=torch.bfloat16,
    ),
}


def build_model(
    config: dict, device: str = "cpu", seed: int = 0, dtype: torch.dtype | None = None
) -> RavenReferenceForCausalLM:
    """The Huginn-shaped reference model with random weights (fixed seed, default init scale), in eval mode."""
    register()
    torch.manual_seed(seed)
    return RavenReferenceForCausalLM(tiny_config(**config)).eval().to(device=device, dtype=dtype)


def prompt(model, length: int, seed: int = 1) -> torch.Tensor:
    """A fixed random prompt [1, length]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g)
    return ids.to(next(model.parameters()).device)


def generate(model, ids: torch.Tensor, steps: int, new_tokens: int) -> torch.Tensor:
    """Greedy decoding of exactly ``new_tokens`` tokens at ``steps`` iterations each (random s0, seeded)."""
    torch.manual_seed(1234)  # s0 is drawn at random: every variant sees the same draws
    with torch.no_grad():
        return model.generate(
            ids, num_steps=steps, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# Capture variants: plain, loopscope, and two hand-written baselines
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = ("plain", "loopscope", "naive", "non_blocking")

VARIANT_NOTES = {
    "plain": "no hooks",
    "loopscope": 'loopscope.attach(model, path, mode="w"); generate; close()',
    "naive": "hook on core_block[-1]: .detach().cpu() into a list; h5py write at the end",
    "non_blocking": 'hook: .to("cpu", non_blocking=True) into a list; h5py write at the end',
}


@dataclass
class Result:
    variant: str
    generate_s: float  # wall time of model.generate() alone
    total_s: float  # attach/hook + generate + close/final write: what the user waits for
    bytes: int  # state bytes recorded (payload, not file size)
    output: torch.Tensor
    cpu_s: float = 0.0  # process CPU time (every thread) over total_s: far less sensitive to other load than wall


def states_bytes(path: str) -> int:
    """Payload bytes of every states dataset of a loopscope capture (read back through the public reader)."""
    total = 0
    with loopscope.open(path) as f:
        for run in f.runs:
            for loop in run.loops:
                ds = run.dataset(loop)
                total += ds.size * ds.dtype.itemsize
    return total


def _write_list_h5(path: str, states: list[torch.Tensor], steps: int) -> int:
    """What a hand-written recorder does at the end: group the calls per forward, stack, one h5py dataset.

    Every forward runs ``steps`` iterations, so calls [i*steps, (i+1)*steps) are one forward's [B, T, H] states.
    Result: [B, tokens, steps, H] contiguous, the same layout loopscope stores (minus s0).
    """
    forwards = [
        torch.stack(states[i : i + steps], dim=2) for i in range(0, len(states), steps)
    ]  # each [B, T_f, steps, H]
    states_all = torch.cat(forwards, dim=1)
    if states_all.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits, as a hand-written recorder stores them
        states_all = states_all.view(torch.int16)
    array = states_all.numpy()
    with h5py.File(path, "w") as f:
        f.create_dataset("states", data=array)
    return array.nbytes


def run_variant(variant: str, model, ids, steps: int, new_tokens: int, workdir: str) -> Result:
    """One timed generate() under ``variant``; the capture file is deleted afterwards."""
    device = str(ids.device)
    path = os.path.join(workdir, f"{variant}.h5")
    states: list[torch.Tensor] = []
    nbytes = 0
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "plain":
        tg0 = time.perf_counter()
        out = generate(model, ids, steps, new_tokens)
        sync(device)
        tg1 = time.perf_counter()
    elif variant == "loopscope":
        cap = loopscope.attach(model, path, mode="w")
        tg0 = time.perf_counter()
        out = generate(model, ids, steps, new_tokens)
        sync(device)
        tg1 = time.perf_counter()
        cap.close()
    elif variant in ("naive", "non_blocking"):
        if variant == "naive":

            def hook(module, args, output):
                states.append(output.detach().cpu())

        else:

            def hook(module, args, output):
                states.append(output.detach().to("cpu", non_blocking=True))

        handle = model.transformer.core_block[-1].register_forward_hook(hook)
        tg0 = time.perf_counter()
        try:
            out = generate(model, ids, steps, new_tokens)
            sync(device)
        finally:
            handle.remove()
        tg1 = time.perf_counter()
        nbytes = _write_list_h5(path, states, steps)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    t1, c1 = time.perf_counter(), time.process_time()
    if variant == "loopscope":
        nbytes = states_bytes(path)
    states.clear()  # the hand-written recorders' states are freed before the next variant runs
    clear_dir(workdir)
    return Result(variant, tg1 - tg0, t1 - t0, nbytes, out.cpu(), c1 - c0)


def interleaved(variants, repeats: int, run):
    """Run ``run(variant)`` ``repeats`` times per variant, rotating the order each round so slow drift of the
    machine (thermal, page cache, neighbours) lands on every variant alike. Returns {variant: [results]}."""
    results: dict[str, list] = {v: [] for v in variants}
    order = list(variants)
    for r in range(repeats):
        for v in order[r % len(order) :] + order[: r % len(order)]:
            results[v].append(run(v))
    return results


def wall_rows(times: dict, variants, baseline: str = "plain") -> list[list[str]]:
    """Per variant: its minimum and median wall time (the first item of each result) and both as ratios to
    ``baseline``'s, formatted for :func:`table`."""
    best = {v: min(r[0] for r in rs) for v, rs in times.items()}
    mid = {v: statistics.median(r[0] for r in rs) for v, rs in times.items()}
    return [
        [v, f"{best[v]:.3f}", f"{mid[v]:.3f}", f"{best[v] / best[baseline]:.3f}", f"{mid[v] / mid[baseline]:.3f}"]
        for v in variants
    ]


def median(values) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------------
# Files and memory
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(prefix: str = "loopscope-bench-"):
    """A temporary directory for captures, removed at the end (under $LOOPSCOPE_BENCH_DIR, else the system's)."""
    path = tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("LOOPSCOPE_BENCH_DIR"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clear_dir(path: str) -> None:
    for name in os.listdir(path):
        full = os.path.join(path, name)
        shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs). False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------------------


def machine_line() -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {cpus} CPU cores, {gpu}; torch {torch.__version__} "
        f"({torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
        f"h5py {h5py.__version__}, loopscope {loopscope.__version__}, python {sys.version.split()[0]}"
    )


def table(title: str, columns: list[str], rows: list[list], caption: str | None = None) -> None:
    """A rich table; the title and caption are printed as plain lines so they never wrap to the table's width."""
    console.print(f"\n[bold]{title}[/bold]")
    t = Table()
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(x) for x in row])
    console.print(t)
    if caption:
        console.print(caption)


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def fmt_rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / MB:,.1f}" if seconds > 0 and nbytes else "-"
