"""ALBERT (transformers): shared layer groups called once per layer, one loop per group."""

from __future__ import annotations

from torch import nn

from .adapter import LoopAdapter, LoopSpec, has_module, lens_fields


def adapter(model: nn.Module) -> LoopAdapter | None:
    """transformers-native ALBERT: shared layer groups, ``num_hidden_layers`` group calls per forward.

    ``AlbertTransformer`` calls group ``int(i / (num_hidden_layers / num_hidden_groups))`` at layer ``i``, so each
    group runs a consecutive share of the layers. One group (the usual ALBERT) is one loop, ``core``; several groups
    are several recurrent blocks, recorded as one loop each (``group_0``, ``group_1``, ...), each with its own s0:
    the state it reads at its first call (for group 0 the output of ``embedding_hidden_mapping_in``, for group g the
    last state of group g - 1).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_groups") or not hasattr(config, "num_hidden_layers"):
        return None
    prefix = next(
        (
            p
            for p in ("albert.", "")
            if has_module(model, p + "encoder.albert_layer_groups")
            and has_module(model, p + "encoder.embedding_hidden_mapping_in")
        ),
        None,
    )
    if prefix is None:
        return None
    layers, groups = int(config.num_hidden_layers), int(config.num_hidden_groups)
    runs = [int(i / (layers / groups)) for i in range(layers)]  # the group each layer calls, as AlbertTransformer does
    used = sorted(set(runs))
    path = prefix + "encoder.albert_layer_groups."
    loops = tuple(
        LoopSpec(
            name="core" if groups == 1 else f"group_{g}",
            exit=f"{path}{g}",
            entry=f"{path}{g}",
            entry_arg=0,
            # the MLM head (dense, activation, LayerNorm, decoder) reads the last group's output as it is
            **lens_fields(model, ("predictions",), "an AlbertModel has no MLM head; load AlbertForMaskedLM"),
        )
        for g in used
    )
    shares = ", ".join(f"group {g}: {runs.count(g)}" for g in used)
    return LoopAdapter(
        family="albert",
        loops=loops,
        # Every AlbertLayer ends in its LayerNorm and the heads (MLM, pooler) read the last group's output as it is.
        readout="identity",
        steps_from="config.num_hidden_layers (one group call per layer), shared out over config.num_hidden_groups",
        notes=(
            f"iterations per forward: {shares}",
            "s0 is the first call's input: the output of encoder.embedding_hidden_mapping_in for the first group",
            "an encoder: one run per batch row of each forward, no generate()",
        ),
    )
