"""Loop adapters: small declarative records saying where a model family's loop is.

A record names the module whose one call is one iteration (the *exit*), where to read the initial state s0, which
norm maps a state into the space the model reads out from, and what sets the iteration count. Families are matched
by their config keys and module tree; anything else falls back to ``loop="dotted.path"`` (see ``hooks/detect.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn


@dataclass(frozen=True)
class LoopSpec:
    """One recurrent stream of a model."""

    name: str
    exit: str  # dotted module path; its k-th call in one forward produces s_k (tied copies: 'a|b|c', called in turn)
    entry: str | None = None  # module whose input at the first iteration holds s0 (None: the exit module's own input)
    entry_channels: int | None = None  # keep only the first N channels of that input (Huginn's adapter sees [s, e])
    entry_arg: int | str = 0  # positional index or keyword name of the entry input that carries s0
    s0_parameter: str | None = None  # s0 is this (learned or frozen) parameter broadcast over tokens, e.g. HRM's z_L_init
    output_index: int = 0  # element of a tuple output that is the state
    nesting: tuple[str, ...] = ()  # label names for nested loops, e.g. ("h", "l")
    inner_steps: int | None = None  # iterations of this loop per outer iteration, for nested labels
    # Per-token scalars recorded beside the states, as (signal name, dotted module path): each call of the module
    # during a forward stores its output ([B, T] or [B, T, 1]) at the loop's current step, e.g. Ouro's exit gate.
    signals: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, ())}


@dataclass(frozen=True)
class LoopAdapter:
    """Everything loopscope needs to know about one model's recurrence."""

    family: str
    loops: tuple[LoopSpec, ...]
    readout: str | None = None  # dotted path of the final norm (stored so analysis needs no model)
    steps_from: str = ""  # what sets the iteration count, for the file's metadata
    notes: tuple[str, ...] = field(default_factory=tuple)
    # Model methods that compute new tokens without going through forward() (Huginn's adaptive decoding calls
    # embed_inputs, then the core block step by step): each call starts a new group of tokens, like a forward.
    entry_methods: tuple[str, ...] = ()
    # Model methods whose whole call is one run per batch row, like generate() (e.g. a token-by-token prefill).
    call_methods: tuple[str, ...] = ()
    # generate() kwargs that switch on Huginn's per-iteration exit evaluators (``init(latents)``/``check(...)``):
    # loopscope then watches the evaluator to learn each row's own exit step.
    exit_evaluator_kwargs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "loops": [spec.to_dict() for spec in self.loops],
            "readout": self.readout,
            "steps_from": self.steps_from,
            "notes": list(self.notes),
            **{k: list(v) for k in ("entry_methods", "call_methods") if (v := getattr(self, k))},
        }


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def raven(model: nn.Module) -> LoopAdapter | None:
    """Huginn-0125 / Raven remote code, retrofitted-recurrence models, and our reference model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "mean_recurrence"):
        return None
    if not (_has(model, "transformer.core_block") and _has(model, "transformer.adapter")):
        return None
    core = model.get_submodule("transformer.core_block")
    hidden = getattr(config, "n_embd", None) or getattr(config, "hidden_size")
    return LoopAdapter(
        family="huginn-raven",
        loops=(
            LoopSpec(
                name="core",
                exit=f"transformer.core_block.{len(core) - 1}",
                entry="transformer.adapter",
                entry_channels=int(hidden),
            ),
        ),
        readout="transformer.ln_f" if _has(model, "transformer.ln_f") else None,
        steps_from="num_steps= forward/generate kwarg, else config.mean_recurrence; with criterion= each row's exit",
        notes=(
            "s0 is the first n_embd channels of transformer.adapter's input at the first iteration",
            "the model ignores attention_mask; it is recorded as the caller passed it",
            "adaptive exit (generate(criterion=...)): a batch iterates until every row exits; num_steps is each "
            "row's own exit step, later stored steps of an exited row are iterations it was carried through",
            "signal exit_value: the exit criterion's value per check, on the last position of each forward",
        ),
        entry_methods=("embed_inputs",),
        call_methods=("forward_with_adaptive_compute", "generate_with_adaptive_compute", "generate_minimal"),
        exit_evaluator_kwargs=("criterion", "exit_threshold", "exit_evaluator"),
    )


def hrm_text(model: nn.Module) -> LoopAdapter | None:
    """transformers-native HRM-Text: a slow H stream and a fast L stream, L_cycles L-steps per H-step."""
    config = getattr(model, "config", None)
    if config is None or not (hasattr(config, "H_cycles") and hasattr(config, "L_cycles")):
        return None
    prefix = next((p for p in ("model.", "") if _has(model, p + "H_module") and _has(model, p + "L_module")), None)
    if prefix is None:
        return None
    return LoopAdapter(
        family="hrm_text",
        loops=(
            # z_H starts as the scaled input embeddings, which the rotary embedding receives first.
            LoopSpec(name="H", exit=prefix + "H_module", entry=prefix + "rotary_emb", entry_arg=0),
            LoopSpec(
                name="L",
                exit=prefix + "L_module",
                s0_parameter=prefix + "z_L_init",
                nesting=("h", "l"),
                inner_steps=int(config.L_cycles),
            ),
        ),
        # Both stacks end in an unweighted RMSNorm and lm_head reads z_H directly: states are already readouts.
        readout="identity",
        steps_from="config.H_cycles (H) and config.H_cycles * config.L_cycles (L)",
        notes=("L step k is cycle (h, l) = divmod(k - 1, L_cycles); see loops/L/step_labels",),
    )


def inkling2_loop(model: nn.Module) -> LoopAdapter | None:
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
    prefix = next((p for p in ("model.", "model.language_model.", "") if _has(model, p + "layers")), None)
    if prefix is None:
        return None
    start, end = int(config.loop_layer_index_start), int(config.loop_layer_index_end)
    return LoopAdapter(
        family="inkling2_loop",
        loops=(LoopSpec(name="core", exit=f"{prefix}layers.{end - 1}", entry=f"{prefix}layers.{start}", entry_arg=0),),
        # The final norm reads the output of post-loop layers and block residuals, not the loop state itself.
        readout=None,
        steps_from="config.loop_num_passes",
        notes=(f"looped slice layers[{start}:{end}]; one iteration = one pass",),
    )


def albert(model: nn.Module) -> LoopAdapter | None:
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
        (p for p in ("albert.", "") if _has(model, p + "encoder.albert_layer_groups")
         and _has(model, p + "encoder.embedding_hidden_mapping_in")),
        None,
    )
    if prefix is None:
        return None
    layers, groups = int(config.num_hidden_layers), int(config.num_hidden_groups)
    runs = [int(i / (layers / groups)) for i in range(layers)]  # the group each layer calls, as AlbertTransformer does
    used = sorted(set(runs))
    path = prefix + "encoder.albert_layer_groups."
    loops = tuple(
        LoopSpec(name="core" if groups == 1 else f"group_{g}", exit=f"{path}{g}", entry=f"{path}{g}", entry_arg=0)
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


def ouro(model: nn.Module) -> LoopAdapter | None:
    """Ouro (ByteDance's looped LM, "Scaling Latent Reasoning via Looped Language Models") and our reference model.

    The decoder stack runs ``total_ut_steps`` times; every pass ends in ``model.norm``, whose output is both the next
    pass's input and what ``lm_head`` reads, so the norm is the exit (one call per pass) and states need no readout
    norm. ``model.early_exit_gate`` turns each pass's normalised output into one exit logit per token.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "total_ut_steps"):
        return None
    prefix = next(
        (p for p in ("model.", "") if all(_has(model, p + m) for m in ("norm", "layers.0", "early_exit_gate"))), None
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


def dory(model: nn.Module) -> LoopAdapter | None:
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
    prefix = next((p for p in ("model.", "") if _has(model, p + "layers")), None)
    if prefix is None:
        return None
    start = int(config.n_input_layers)
    end = start + int(config.n_recurrent_layers)
    return LoopAdapter(
        family="dory",
        loops=(LoopSpec(name="core", exit=f"{prefix}layers.{end - 1}", entry=f"{prefix}layers.{start}", entry_arg=0),),
        readout=None,  # the states are pre-norm residuals; the output section runs after the loop
        steps_from="config.n_recurrent_loops (read at every forward)",
        notes=(
            f"looped slice layers[{start}:{end}]; one iteration = one loop over it",
            "s0 is the first loop's input norm(h) + norm(h); states are the last recurrent layer's outputs",
            f"recurrent_kv_cache_mode={getattr(config, 'recurrent_kv_cache_mode', '?')}",
        ),
    )


KNOWN_FAMILIES = (raven, hrm_text, inkling2_loop, ouro, albert, dory)
