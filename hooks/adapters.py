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
    exit: str  # dotted module path; its k-th call in one forward produces s_k
    entry: str | None = None  # module whose input at the first iteration holds s0 (None: the exit module's own input)
    entry_channels: int | None = None  # keep only the first N channels of that input (Huginn's adapter sees [s, e])
    entry_arg: int | str = 0  # positional index or keyword name of the entry input that carries s0
    output_index: int = 0  # element of a tuple output that is the state
    nesting: tuple[str, ...] = ()  # label names for nested loops, e.g. ("h", "l")
    inner_steps: int | None = None  # iterations of this loop per outer iteration, for nested labels

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

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "loops": [spec.to_dict() for spec in self.loops],
            "readout": self.readout,
            "steps_from": self.steps_from,
            "notes": list(self.notes),
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
        steps_from="num_steps= forward/generate kwarg, else config.mean_recurrence",
        notes=(
            "s0 is the first n_embd channels of transformer.adapter's input at the first iteration",
            "the model ignores attention_mask; it is recorded as the caller passed it",
        ),
    )


KNOWN_FAMILIES = (raven,)
