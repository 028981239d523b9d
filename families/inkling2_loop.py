"""Inkling-2 loop (transformers 5.x ``inkling2_loop``): a slice of ``model.layers`` run several passes."""

from __future__ import annotations

from torch import nn

from .adapter import LoopAdapter, has_module, layer_slice


def adapter(model: nn.Module) -> LoopAdapter | None:
    """transformers-native Inkling-2 loop: ``layers[start:end]`` run ``loop_num_passes`` times.

    The looped range is a slice of ``model.layers``, not a module, so its last layer is the exit (one call per
    pass) and its first layer's input at the first pass is s0. Passes 2+ restart from those pre-loop states plus
    messages from the previous pass, so s0 is also where every pass begins.
    """
    config = getattr(model, "config", None)
    if config is None or not all(
        hasattr(config, k) for k in ("loop_layer_index_start", "loop_layer_index_end", "loop_num_passes")
    ):
        return None
    prefix = next((p for p in ("model.", "model.language_model.", "") if has_module(model, p + "layers")), None)
    if prefix is None:
        return None
    start, end = int(config.loop_layer_index_start), int(config.loop_layer_index_end)
    return LoopAdapter(
        family="inkling2_loop",
        loops=(
            layer_slice(
                model,
                f"{prefix}layers",
                start,
                end,
                (f"{prefix}norm", "lm_head", "logit_softcap"),  # post-loop layers and block residuals are skipped
                "the model has no final norm, lm_head and logit softcap; load Inkling2LoopForCausalLM",
            ),
        ),
        # The final norm reads the output of post-loop layers and block residuals, not the loop state itself.
        readout=None,
        steps_from="config.loop_num_passes",
        notes=(f"looped slice layers[{start}:{end}]; one iteration = one pass",),
    )
