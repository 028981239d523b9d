"""Byte reduction before the copy: which tokens and which iterations a capture stores.

Both selections are applied on the model's device, before any transfer: left-out tokens are dropped with one
``index_select`` per state, and left-out iterations are never copied at all. What was kept is written into the
file (token positions, ``step_stride``), so analysis never has to guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..storage.errors import LoopscopeError
from .adapters import LoopAdapter

_NAMED = ("all", "prompt", "generated")


@dataclass(frozen=True)
class TokenSelection:
    """``"all"``, ``"prompt"`` (a run's first forward: the prefill), ``"generated"`` (every later forward), or the
    token positions to keep (a ``slice``, ``range`` or list of ints; positions count from the run's first token)."""

    named: str | None = None
    span: slice | None = None
    positions: frozenset[int] | None = None

    @classmethod
    def parse(cls, value) -> TokenSelection:
        if isinstance(value, str):
            if value not in _NAMED:
                raise LoopscopeError(f"tokens={value!r} is not one of {', '.join(_NAMED)}, a slice, or a list of positions")
            return cls(named=value)
        if isinstance(value, slice):
            start, stop, step = value.start or 0, value.stop, value.step or 1
            if start < 0 or (stop is not None and stop < 0) or step < 1:
                raise LoopscopeError(f"tokens={value!r}: use non-negative positions and a positive step")
            return cls(span=slice(start, stop, step))
        if isinstance(value, range):
            return cls.parse(slice(value.start, value.stop, value.step))
        if isinstance(value, Sequence) and all(isinstance(v, (int, np.integer)) and v >= 0 for v in value):
            return cls(positions=frozenset(int(v) for v in value))
        raise LoopscopeError(f"tokens={value!r} is not one of {', '.join(_NAMED)}, a slice, or a list of positions")

    def keep(self, forward_index: int, positions: np.ndarray) -> np.ndarray | None:
        """Indices (into this forward's tokens) to store; None means every token."""
        if self.named == "all":
            return None
        if self.named is not None:
            wanted = (forward_index == 0) == (self.named == "prompt")
            return None if wanted else np.empty(0, dtype=np.int64)
        if self.span is not None:
            s = self.span
            mask = (positions >= s.start) & ((positions - s.start) % s.step == 0)
            if s.stop is not None:
                mask &= positions < s.stop
        else:
            mask = np.isin(positions, sorted(self.positions))
        return None if mask.all() else np.flatnonzero(mask)

    def describe(self) -> str:
        if self.named is not None:
            return self.named
        if self.span is not None:
            s = self.span
            return f"positions {s.start}:{'' if s.stop is None else s.stop}:{s.step}"
        return "positions " + ",".join(str(p) for p in sorted(self.positions))


def check_stride(step_stride, adapter: LoopAdapter) -> int:
    if isinstance(step_stride, bool) or not isinstance(step_stride, (int, np.integer)) or step_stride < 1:
        raise LoopscopeError(f"step_stride={step_stride!r} must be a positive integer (1 keeps every iteration)")
    if step_stride > 1 and any(spec.inner_steps for spec in adapter.loops):
        raise LoopscopeError(
            f"step_stride={step_stride} cannot be combined with the nested loops of {adapter.family} "
            "(their (outer, inner) labels need every step); use step_stride=1 or tokens= to save space"
        )
    return int(step_stride)


def slot_of(step: int, last: int, stride: int) -> int | None:
    """Where iteration ``step`` is stored when the token ran ``last`` iterations: every ``stride``-th iteration,
    plus the last one in the slot after; None when it is not stored."""
    if step % stride == 0:
        return step // stride
    if step == last:
        return step // stride + 1
    return None
