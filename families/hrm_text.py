"""HRM-Text (transformers 5.x ``hrm_text``): a slow H stream and a fast L stream, two loops in one record."""

from __future__ import annotations

from torch import nn

from .adapter import LoopAdapter, LoopSpec, has_module, lens_fields


def adapter(model: nn.Module) -> LoopAdapter | None:
    """transformers-native HRM-Text: a slow H stream and a fast L stream, L_cycles L-steps per H-step."""
    config = getattr(model, "config", None)
    if config is None or not (hasattr(config, "H_cycles") and hasattr(config, "L_cycles")):
        return None
    prefix = next(
        (p for p in ("model.", "") if has_module(model, p + "H_module") and has_module(model, p + "L_module")), None
    )
    if prefix is None:
        return None
    return LoopAdapter(
        family="hrm_text",
        loops=(
            # z_H starts as the scaled input embeddings, which the rotary embedding receives first.
            LoopSpec(
                name="H",
                exit=prefix + "H_module",
                entry=prefix + "rotary_emb",
                entry_arg=0,
                # H_module ends in the final norm whose output lm_head reads: the lens is exact at the last step
                **lens_fields(
                    model,
                    ("lm_head",),
                    "a bare HRM-Text model has no lm_head; load HrmTextForCausalLM",
                    lens_head="lm_head.weight",
                    lens_tied=prefix + "embed_tokens.weight",
                ),
            ),
            LoopSpec(
                name="L",
                exit=prefix + "L_module",
                s0_parameter=prefix + "z_L_init",
                nesting=("h", "l"),
                inner_steps="H",  # L steps per H step, counted in each run (L_cycles may change after attach)
                no_lens="HRM-Text's L stream only feeds the H stream: no head reads its states",
            ),
        ),
        # Both stacks end in an unweighted RMSNorm and lm_head reads z_H directly: states are already readouts.
        readout="identity",
        steps_from="config.H_cycles (H) and config.H_cycles * config.L_cycles (L)",
        notes=("L step k is cycle (h, l) = divmod(k - 1, L_cycles); see loops/L/step_labels",),
    )
