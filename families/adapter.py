"""Loop adapters: small declarative records saying where a model family's loop is.

A record names the module whose one call is one iteration (the *exit*), where to read the initial state s0, which
norm maps a state into the space the model reads out from, and what sets the iteration count. Each family's module in
this package builds one from a model it recognises; anything else falls back to ``loop="dotted.path"`` or a probe
forward (see ``hooks/detect.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

#: A family's watcher around a whole call (``generate()`` or a call method): given the model, the call's args and
#: kwargs, and ``report(exits, values)``, it returns the args and kwargs to call with (see ``families/huginn.py``).
CallWatcher = Callable[[nn.Module, tuple, dict, Callable[[Any, Any], None]], tuple[tuple, dict]]


@dataclass(frozen=True)
class LoopSpec:
    """One recurrent stream of a model."""

    name: str
    exit: str  # dotted module path; its k-th call in one forward produces s_k (tied copies: 'a|b|c', called in turn)
    entry: str | None = None  # module whose input at the first iteration holds s0 (None: the exit module's own input)
    entry_channels: int | None = None  # keep only the first N channels of that input (Huginn's adapter sees [s, e])
    entry_arg: int | str = 0  # positional index or keyword name of the entry input that carries s0
    # s0 is this (learned or frozen) parameter broadcast over tokens, e.g. HRM's z_L_init
    s0_parameter: str | None = None
    output_index: int = 0  # element of a tuple output that is the state
    nesting: tuple[str, ...] = ()  # label names for nested loops, e.g. ("h", "l")
    # iterations of this loop per outer iteration, for nested labels; or the outer loop's name, when the count is
    # this loop's steps over the outer one's in each run (HRM-Text: it follows L_cycles changed after attach())
    inner_steps: int | str | None = None
    # Per-token scalars recorded beside the states, as (signal name, dotted module path): each call of the module
    # during a forward stores its output ([B, T] or [B, T, 1]) at the loop's current step, e.g. Ouro's exit gate.
    signals: tuple[tuple[str, str], ...] = ()
    # The logit lens (analysis/readout_lens.py): the modules that turn this loop's state into next-token logits,
    # applied in order to a loaded model's states, e.g. ("transformer.ln_f", "lm_head"). Empty: none does; ``no_lens``
    # says why.
    lens: tuple[str, ...] = ()
    no_lens: str | None = None
    # The same from a checkpoint directory, reading two tensors instead of the model: the stored readout norm, then
    # this plain linear head's weight (its ``.bias`` too, when the checkpoint has one), or ``lens_tied`` (the
    # embedding a tied head shares) when the checkpoint leaves the head out. None: the head is more than a matrix.
    lens_head: str | None = None
    lens_tied: str | None = None

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
    # Family code run around each whole call to learn each row's own exit step (Huginn's exit evaluators); it must
    # pass the call through unchanged. Not part of the record stored in the file.
    watch_call: CallWatcher | None = field(default=None, compare=False, repr=False)
    # The coda lens: a model method that decodes a whole step's states of a sequence through the layers after the
    # loop, as the model does with its last state (Huginn's ``predict_from_latents``). None: the family has no coda.
    coda_method: str | None = None

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "loops": [spec.to_dict() for spec in self.loops],
            "readout": self.readout,
            "steps_from": self.steps_from,
            "notes": list(self.notes),
            **{k: list(v) for k in ("entry_methods", "call_methods") if (v := getattr(self, k))},
            **({"coda_method": self.coda_method} if self.coda_method else {}),
        }


def lens_fields(model: nn.Module, lens: tuple[str, ...], missing: str, **weights: str | None) -> dict:
    """``LoopSpec`` lens fields: ``lens`` (and the checkpoint ``weights``: ``lens_head``, ``lens_tied``) when the
    model has every module of it, else ``no_lens`` saying what is ``missing``."""
    if lens and all(has_module(model, path) for path in lens):
        return {"lens": lens, **weights}
    return {"no_lens": missing}


def layer_slice(model: nn.Module, layers: str, start: int, end: int, lens: tuple[str, ...], missing: str) -> LoopSpec:
    """The loop of a model whose looped range is the slice ``layers[start:end]`` of a ModuleList (Dory, Inkling-2):
    its last layer's call ends an iteration, its first layer's input at the first pass is s0. The lens skips the
    layers after the loop, as a logit lens does."""
    return LoopSpec(
        name="core",
        exit=f"{layers}.{end - 1}",
        entry=f"{layers}.{start}",
        entry_arg=0,
        **lens_fields(model, lens, missing),
    )


def has_module(model: nn.Module, path: str) -> bool:
    """Whether ``model`` has a submodule at the dotted ``path``."""
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True
