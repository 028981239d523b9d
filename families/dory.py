"""Dory (NVIDIA Nemotron-Labs Dory, transformers 5.x ``dory``): a recurrent slice of ``model.layers``."""

from __future__ import annotations

from torch import nn

from .adapter import LoopAdapter, has_module, layer_slice


def adapter(model: nn.Module) -> LoopAdapter | None:
    """transformers-native Dory (NVIDIA Nemotron-Labs): ``layers[n_input:n_input + n_recurrent]`` run
    ``n_recurrent_loops`` times, each loop starting from ``norm(h) + norm(input section's output)``.

    ``model.norm`` (an L2 norm) is called loops + 2 times per forward, so it is never the exit: the last recurrent
    layer is, and the first recurrent layer's input at the first loop is s0 (the injected state the loop starts
    from; later loops re-inject ``norm(s_k) + input``).
    """
    config = getattr(model, "config", None)
    if config is None or not all(
        hasattr(config, k) for k in ("n_recurrent_loops", "n_input_layers", "n_recurrent_layers")
    ):
        return None
    prefix = next((p for p in ("model.", "") if has_module(model, p + "layers")), None)
    if prefix is None:
        return None
    start = int(config.n_input_layers)
    end = start + int(config.n_recurrent_layers)
    return LoopAdapter(
        family="dory",
        loops=(
            layer_slice(
                model,
                f"{prefix}layers",
                start,
                end,
                (f"{prefix}norm", "lm_head"),  # the output section after the loop is skipped
                "the model has no final norm and lm_head; load DoryForCausalLM",
            ),
        ),
        readout=None,  # the states are pre-norm residuals; the output section runs after the loop
        steps_from="config.n_recurrent_loops (read at every forward)",
        notes=(
            f"looped slice layers[{start}:{end}]; one iteration = one loop over it",
            "s0 is the first loop's input norm(h) + norm(h); states are the last recurrent layer's outputs",
            f"recurrent_kv_cache_mode={getattr(config, 'recurrent_kv_cache_mode', '?')}",
        ),
    )
