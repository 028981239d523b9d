"""Ouro (ByteDance's looped LM, hub remote code) and our Ouro-style reference model."""

from __future__ import annotations

from torch import nn

from .adapter import LoopAdapter, LoopSpec, has_module, lens_fields


def adapter(model: nn.Module) -> LoopAdapter | None:
    """Ouro (ByteDance's looped LM, "Scaling Latent Reasoning via Looped Language Models") and our reference model.

    The decoder stack runs ``total_ut_steps`` times; every pass ends in ``model.norm``, whose output is both the next
    pass's input and what ``lm_head`` reads, so the norm is the exit (one call per pass) and states need no readout
    norm. ``model.early_exit_gate`` turns each pass's normalised output into one exit logit per token.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "total_ut_steps"):
        return None
    prefix = next(
        (p for p in ("model.", "") if all(has_module(model, p + m) for m in ("norm", "layers.0", "early_exit_gate"))),
        None,
    )
    if prefix is None:
        return None
    return LoopAdapter(
        family="ouro",
        loops=(
            LoopSpec(
                name="core",
                exit=prefix + "norm",
                entry=prefix + "layers.0",
                entry_arg=0,
                signals=(("exit_gate", prefix + "early_exit_gate"),),
                # every pass's normed output is what lm_head reads: the lens is the model's own per-pass logits
                **lens_fields(
                    model,
                    ("lm_head",),
                    "a bare Ouro model has no lm_head; load the causal LM class",
                    lens_head="lm_head.weight",
                    lens_tied=prefix + "embed_tokens.weight",
                ),
            ),
        ),
        # The norm's output is the state, and lm_head reads it directly: states 1..n are already readouts.
        readout="identity",
        steps_from="model.total_ut_steps (copied from config.total_ut_steps when the model is built)",
        notes=(
            "s0 is the input of the first shared layer at the first pass (the token embeddings, not normalised)",
            "signal exit_gate: early_exit_gate's output at each pass, a logit (the exit probability is its sigmoid); "
            "step 0 has none",
            "every pass runs for every token: an exit threshold or exit step picks which pass the head reads, "
            "so num_steps is always total_ut_steps",
        ),
    )
