"""How fast is the readout lens, against the torch loop a user would write over the same states?

    python benchmarks/lens_rate.py            # ~35 s: 128 tokens x 17 states, E=256, V=32768
    python benchmarks/lens_rate.py --small    # ~8 s smoke run (32 tokens)
    python benchmarks/lens_rate.py --tokens 256 --steps 32 --vocab 320 --embd 512

A capture of one prefill run is made with the Huginn-shaped reference model (random weights, ``--vocab`` ids,
padded vocabulary = vocabulary), then every stored state (s0 and each iteration) is read out into a next-token
distribution and measured, the same measures each way: top-5 ids and probabilities, entropy, KL to the token's last
step and to the previous step, rank and probability of the last step's top-1 token. Variants, timed interleaved
after one untimed warm-up each, best and median of ``--repeats``:

* lens                       ``loopscope.analysis.lens(run, model)`` (logit kind, the loaded model's ln_f and head):
                             block reads, one readout per block, then ``lens_measure.measure``: float64
                             ``log_softmax`` per sub-block of ``SUB_BYTES`` and the entropy and both KLs from one
                             float64 G = p log p^T per token (``_fused``);
* straightforward            per token: ``run.states(token=t)``, ``lm_head(ln_f(s))``, ``log_softmax`` in float64,
                             the measures in plain torch, vectorised over the token's steps;
* straightforward, one read  the same loop over ``run.states()`` read once (read cost against compute).

Throughput is token-steps per second: stored states read out (tokens x stored steps, s0 included); each call's
kernel CPU time and minor page faults (getrusage) are given beside it, since arrays of more than glibc's mmap
threshold come back as fresh, zero-filled pages on every allocation. The lens and the straightforward loop are
checked once against each other (top-1 ids equal, KL within 1e-6 relative), and the one-read loop against the
straightforward loop. A second table times the phases of the lens (setup, read, ln_f, lm_head, float64 +
log_softmax, measures, assemble) and of the straightforward loop: one instrumented pass of each per round, best of
the rounds per phase. The lens' pass is ``lens(run, model)`` itself with its library calls wrapped by a clock
(``lens_phases``), not a copy of its code, so the table follows the library's code path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import sys
import time

import _common as c  # noqa: I001 - sets OMP_WAIT_POLICY before torch is imported
import numpy as np
import torch

import loopscope
from loopscope.analysis import lens, lens_measure, lens_readout, readout_lens

TOP_K = 5
PHASES = ("setup", "read", "ln_f", "lm_head", "float64 + log_softmax", "measures", "assemble")
MEASURES = ("top_ids", "top_probs", "entropy", "kl_final", "kl_previous", "final_rank", "final_prob")


# ---------------------------------------------------------------------------------------------------------------
# The capture
# ---------------------------------------------------------------------------------------------------------------


def make_capture(path: str, tokens: int, steps: int, vocab: int, embd: int):
    config = dict(
        n_embd=embd,
        num_attention_heads=max(1, embd // 64),
        intermediate_size=2 * embd,
        vocab_size=vocab,
        padded_vocab_size=vocab,
        block_size=max(512, tokens),
    )
    model = c.build_model(config)
    ids = c.prompt(model, tokens)
    torch.manual_seed(1234)  # s0 is drawn at random
    with loopscope.attach(model, path, mode="w"), torch.no_grad():
        model(ids, num_steps=steps)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The straightforward loop a user would write
# ---------------------------------------------------------------------------------------------------------------


class _Clock:
    """Adds the time since the last call to ``phases[name]``; does nothing without a dict."""

    def __init__(self, phases: dict | None):
        self.phases, self.t = phases, time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.phases is None:
            return
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.t
        self.t = now


def _empty(n_tokens: int, n_slots: int, top_k: int) -> dict[str, np.ndarray]:
    return {
        "top_ids": np.full((n_tokens, n_slots, top_k), -1, dtype=np.int64),
        "top_probs": np.full((n_tokens, n_slots, top_k), np.nan),
        "entropy": np.full((n_tokens, n_slots), np.nan),
        "kl_final": np.full((n_tokens, n_slots), np.nan),
        "kl_previous": np.full((n_tokens, n_slots), np.nan),
        "final_rank": np.full((n_tokens, n_slots), -1, dtype=np.int64),
        "final_prob": np.full((n_tokens, n_slots), np.nan),
    }


@torch.no_grad()
def straightforward(run, model, top_k: int = TOP_K, one_read: bool = False, phases: dict | None = None) -> dict:
    """Token by token: its states, ln_f and the head, float64 log_softmax, the measures over its steps."""
    ln_f, head = model.transformer.ln_f, model.lm_head
    n_tokens, n_slots, _ = run.dataset().shape
    out = _empty(n_tokens, n_slots, top_k)
    clock = _Clock(phases)
    everything = run.states() if one_read else None
    last = run.steps_of(None) if one_read else None
    clock("read")
    for t in range(n_tokens):
        s = run.states(token=t) if everything is None else everything[t, : last[t] + 1]
        clock("read")
        x = ln_f(torch.from_numpy(s))
        clock("ln_f")
        logits = head(x)
        clock("lm_head")
        logp = torch.log_softmax(logits.double(), dim=-1)  # [n, V]
        clock("float64 + log_softmax")
        p = logp.exp()
        final = logp[-1]
        target = int(final.argmax())
        values, ids = logp.topk(top_k, dim=-1)
        n = len(logp)
        out["top_ids"][t, :n] = ids.numpy()
        out["top_probs"][t, :n] = values.exp().numpy()
        out["entropy"][t, :n] = (-(p * logp).sum(-1)).numpy()
        out["kl_final"][t, :n] = (p * (logp - final)).sum(-1).numpy()
        out["kl_previous"][t, 1:n] = (p[1:] * (logp[1:] - logp[:-1])).sum(-1).numpy()
        target_logp = logp[:, target : target + 1]
        out["final_rank"][t, :n] = (logp > target_logp).sum(-1).numpy()
        out["final_prob"][t, :n] = target_logp[:, 0].exp().numpy()
        clock("measures")
    return out


# ---------------------------------------------------------------------------------------------------------------
# The lens, instrumented: lens(run, model) itself, with a clock at the end of each library call of its code path
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _patched(target, name: str, make):
    """``target.name`` replaced by ``make(original)`` for the duration (AttributeError if the library renamed it);
    an instance's method is shadowed by an instance attribute, then deleted."""
    original = getattr(target, name)
    own = name in vars(target)
    setattr(target, name, make(original))
    try:
        yield
    finally:
        if own:
            setattr(target, name, original)
        else:
            delattr(target, name)


def lens_phases(run, model, phases: dict, top_k: int = TOP_K) -> None:
    """One ``lens(run, model)`` call, timed by phase without copying its code: the library functions on its path
    are wrapped for the call, and each wrapper adds the time since the previous one ended to its phase (a lap
    clock), so glue between calls goes to the call that follows it. ``readout_lens.logit_lens`` per block of
    ``BLOCK_BYTES``: ``run.read`` + ``run.decode`` (read), the ``Readout`` of ``lens_readout.from_model`` (ln_f,
    lm_head: a forward hook on each readout module but the last, the last when ``apply`` returns), then
    ``lens_measure.measure`` per sub-block of ``SUB_BYTES``: ``torch.log_softmax`` (with the slice and ``.double()``
    before it), ``lens_measure._fused`` or ``_stepwise`` (with the -inf check); its concatenation and
    ``lens_measure.assemble`` (assemble). A phase the library no longer passes through shows as "-"; a renamed
    function fails here."""
    clock = _Clock(phases)
    hooks = []

    def marked(fn, phase: str):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            clock(phase)
            return out

        return call

    def from_model(original):
        def call(model, spec, family, override):
            head = original(model, spec, family, override)
            clock("setup")
            paths = tuple(override) if override else spec.lens
            names = [path.rsplit(".", 1)[-1] for path in paths]
            for path, name in zip(paths[:-1], names[:-1]):
                hook = model.get_submodule(path).register_forward_hook(lambda *_, name=name: clock(name))
                hooks.append(hook)
            return dataclasses.replace(head, apply=marked(head.apply, names[-1]))

        return call

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(lens_readout, "from_model", from_model))
        stack.enter_context(_patched(run, "read", lambda fn: marked(fn, "read")))
        stack.enter_context(_patched(run, "decode", lambda fn: marked(fn, "read")))
        stack.enter_context(_patched(torch, "log_softmax", lambda fn: marked(fn, "float64 + log_softmax")))
        stack.enter_context(_patched(lens_measure, "_fused", lambda fn: marked(fn, "measures")))
        stack.enter_context(_patched(lens_measure, "_stepwise", lambda fn: marked(fn, "measures")))
        stack.enter_context(_patched(readout_lens, "measure", lambda fn: marked(fn, "assemble")))
        stack.enter_context(_patched(readout_lens, "assemble", lambda fn: marked(fn, "assemble")))
        try:
            lens(run, model)
        finally:
            for hook in hooks:
                hook.remove()
    clock("assemble")  # lens() returning


# ---------------------------------------------------------------------------------------------------------------
# Checks and main
# ---------------------------------------------------------------------------------------------------------------


def _as_dict(result) -> dict[str, np.ndarray]:
    return result if isinstance(result, dict) else {name: getattr(result, name) for name in MEASURES}


def compare(reference, other) -> tuple[bool, str]:
    """Top-1 ids equal and KLs within 1e-6 relative (1e-12 absolute where a KL is ~0), blanks in the same places;
    the largest relative differences of the float measures."""
    a, b = _as_dict(reference), _as_dict(other)
    differ = int((a["top_ids"][..., 0] != b["top_ids"][..., 0]).sum())
    ok = differ == 0
    notes = [f"top-1 ids differ: {differ}"]
    for name in ("kl_final", "kl_previous", "entropy", "top_probs", "final_prob"):
        x, y = a[name], b[name]
        blanks = np.isnan(x) | np.isnan(y)
        close = bool(np.array_equal(np.isnan(x), np.isnan(y))) and np.allclose(
            x[~blanks], y[~blanks], rtol=1e-6, atol=1e-12
        )
        if name.startswith("kl"):
            ok = ok and close
        x, y = x[~blanks], y[~blanks]
        large = np.abs(y) > 1e-9  # relative differences of values of 0 (a KL at the last step) say nothing
        rel = np.abs(x[large] - y[large]) / np.abs(y[large])
        notes.append(f"{name} {float(rel.max()) if rel.size else 0.0:.1e}")
    return ok, f"{notes[0]}; max relative difference (where |value| > 1e-9): " + ", ".join(notes[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="~8 s smoke run (32 tokens, 2 repeats)")
    p.add_argument("--tokens", type=int, default=None, help="tokens in the prefill run (default 128, --small 32)")
    p.add_argument("--steps", type=int, default=16, help="iterations of the loop (stored states: steps + 1)")
    p.add_argument("--vocab", type=int, default=32768, help="vocabulary (320 is the demo tokenizer's)")
    p.add_argument("--embd", type=int, default=256, help="n_embd of the reference model")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 5, --small 2)")
    p.add_argument("--no-phases", action="store_true", help="leave out the phase table")
    a = p.parse_args()
    tokens = a.tokens or (32 if a.small else 128)
    repeats = a.repeats or (2 if a.small else 5)
    c.console.print(f"[bold]loopscope readout lens rate[/bold] - {c.machine_line()}")
    c.console.print("command: python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]))

    with c.workdir() as folder:
        path = os.path.join(folder, "lens.h5")
        model = make_capture(path, tokens, a.steps, a.vocab, a.embd)
        with loopscope.open(path) as cap:
            run = cap.runs[0]
            n_tokens, n_slots, hidden = run.dataset().shape
            token_steps = int((run.steps_of(None) + 1).sum())
            variants = {
                "lens": lambda: lens(run, model),
                "straightforward": lambda: straightforward(run, model),
                "straightforward, one read": lambda: straightforward(run, model, one_read=True),
            }

            def timed(name: str, keep: dict | None = None) -> tuple[float, float, int]:
                """Wall seconds, kernel CPU seconds and minor page faults of one call (its result into ``keep``)."""
                u0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                result = variants[name]()
                t1, u1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                if keep is not None:
                    keep[name] = result
                return t1 - t0, u1.ru_stime - u0.ru_stime, u1.ru_minflt - u0.ru_minflt

            outputs: dict = {}
            first = {name: timed(name, outputs) for name in variants}  # warm-up, and the results to compare
            agree, notes = compare(outputs["straightforward"], outputs["lens"])
            checks = [f"results agree: {'yes' if agree else 'no'} (lens against straightforward; {notes})"]
            for name in variants:
                if name not in ("lens", "straightforward"):
                    ok, notes = compare(outputs["straightforward"], outputs[name])
                    checks.append(f"{name} agrees: {'yes' if ok else 'no'} ({notes})")
            del outputs

            measured = c.interleaved(list(variants), repeats, timed)
            results = {name: [m[0] for m in runs] for name, runs in measured.items()}

            instrumented = {
                "lens": lambda phases: lens_phases(run, model, phases),
                "straightforward": lambda phases: straightforward(run, model, phases=phases),
            }
            phase_runs: dict[str, list[dict]] = {name: [] for name in instrumented}
            if not a.no_phases:
                for _ in range(repeats):
                    for name, fn in instrumented.items():
                        phase_runs[name].append({})
                        fn(phase_runs[name][-1])

    best = {name: min(times) for name, times in results.items()}
    med = {name: c.median(times) for name, times in results.items()}
    base = "straightforward"
    rows = [
        [
            name,
            f"{best[name]:.3f}",
            f"{med[name]:.3f}",
            f"{token_steps / best[name]:,.0f}",
            f"{best[base] / best[name]:.2f}",
            f"{med[base] / med[name]:.2f}",
            f"{c.median([m[1] for m in measured[name]]):.2f}",
            f"{c.median([m[2] for m in measured[name]]) / 1e3:,.0f}",
        ]
        for name in variants
    ]
    c.table(
        f"{n_tokens} tokens x {n_slots} stored states (s0 + {a.steps} steps) = {token_steps:,} token-steps; "
        f"H={hidden}, V={a.vocab:,}, top-{TOP_K}, float32 states; warm page cache; best and median of {repeats}",
        ["variant", "best s", "median s", "token-steps/s", "x straightforward", "(median)", "sys s", "faults k"],
        rows,
        caption="token-steps/s at the best time; x straightforward: the straightforward loop's best time / the "
        "variant's best, (median) the same of medians (>1: faster than the loop); sys s (kernel CPU seconds) and "
        "faults k (minor page faults, thousands): medians per call, from getrusage",
    )
    calls = [
        f"{name} {t:.3f} s, sys {kernel:.2f} s, {faults / 1e3:,.0f}k faults"
        for name, (t, kernel, faults) in first.items()
    ]
    c.console.print(
        "first calls (the untimed warm-up, in this order, the lens first in the process): " + "; ".join(calls)
    )
    for line in checks:
        c.console.print(line)

    if not a.no_phases:
        unseen = [k for k in PHASES if not any(k in r for r in phase_runs["lens"])]
        if unseen:
            c.console.print(f"[yellow]lens phases not reached: {', '.join(unseen)} (its code path changed?)[/yellow]")
        seen = {k for runs in phase_runs.values() for r in runs for k in r}
        phases = [k for k in PHASES if k in seen] + sorted(seen - set(PHASES))
        totals = {name: min(sum(r.values()) for r in runs) for name, runs in phase_runs.items()}
        rows = []
        for phase in phases + ["total"]:
            row = [phase]
            for name, runs in phase_runs.items():
                if phase == "total":
                    row += [f"{totals[name]:.3f}", ""]
                elif any(phase in r for r in runs):
                    seconds = min(r.get(phase, 0.0) for r in runs)
                    row += [f"{seconds:.3f}", f"{seconds / totals[name]:.0%}"]
                else:
                    row += ["-", ""]
            rows.append(row)
        c.table(
            f"where the time goes: one instrumented pass per round, best of {repeats} per phase (total: best pass)",
            ["phase"] + [col for name in phase_runs for col in (f"{name} s", "share")],
            rows,
        )


if __name__ == "__main__":
    main()
