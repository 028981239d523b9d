"""Model families loopscope knows by name: one module per family, registered in :data:`FAMILIES`.

Each module has an ``adapter(model)`` that returns the family's :class:`LoopAdapter` for a model it recognises (by
config keys and module tree) and ``None`` otherwise; it may also hold the family's own behaviour (Huginn's exit
watching). Adding a family is one new module and one entry in the list below; models no family recognises are
found by the probe forward in ``hooks/detect.py``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from . import albert, dory, hrm_text, huginn, inkling2_loop, ouro
from .adapter import LoopAdapter, LoopSpec

#: Tried in this order; the first that recognises the model wins.
FAMILIES: tuple[Callable[[nn.Module], LoopAdapter | None], ...] = (
    huginn.adapter,
    hrm_text.adapter,
    inkling2_loop.adapter,
    ouro.adapter,
    albert.adapter,
    dory.adapter,
)

__all__ = ["FAMILIES", "LoopAdapter", "LoopSpec", "match"]


def match(model: nn.Module) -> LoopAdapter | None:
    """The adapter of the first known family that recognises ``model``, else None."""
    for family in FAMILIES:
        adapter = family(model)
        if adapter is not None:
            return adapter
    return None
