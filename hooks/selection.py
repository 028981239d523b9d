"""Byte reduction before the copy: which tokens and which iterations a capture stores.

Both selections are applied on the model's device, before any transfer: left-out tokens are dropped with one
``index_select`` per state, and left-out iterations are never copied at all. What was kept is written into the
file (each kept token's ``positions``, ``step_stride``), so analysis never has to guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import LoopscopeError
from ..families.adapter import LoopAdapter

_NAMED = ("all", "prompt", "generated")


def from_command_line(text: str):
    """``--tokens`` as attach() takes it: a name, ``START:STOP[:STEP]`` (a slice, either end left out) or token
    indices ``3,7,12``; anything else is one line naming the forms."""
    text = text.strip()
    if text in _NAMED:
        return text
    value: slice | list[int] | None = None
    try:
        if ":" in text:
            parts = [int(p) if p.strip() else None for p in text.split(":")]
            value = slice(*parts) if len(parts) <= 3 else None
        else:
            value = [int(p) for p in text.split(",")]
        if value is not None:
            TokenSelection.parse(value)
            return value
    except (ValueError, LoopscopeError):
        pass
    raise LoopscopeError(
        f"--tokens {text}: use {', '.join(_NAMED)}, a slice START:STOP[:STEP] with STOP past START (e.g. 0:64 or "
        "::4), or token indices >= 0 such as 3,7,12"
    )


@dataclass(frozen=True)
class TokenSelection:
    """``"all"``, ``"prompt"`` (the tokens the model was given), ``"generated"`` (the tokens ``generate()`` fed back
    after the prefill), or the token indices to keep (a ``slice``, ``range`` or list of ints counting a run's
    tokens from 0, padding included: the same tokens in every row of a batch)."""

    named: str | None = None
    span: slice | None = None
    indices: frozenset[int] | None = None

    @classmethod
    def parse(cls, value) -> TokenSelection:
        if isinstance(value, str):
            if value not in _NAMED:
                raise LoopscopeError(
                    f"tokens={value!r} is not one of {', '.join(_NAMED)}, a slice, or a list of token indices"
                )
            return cls(named=value)
        if isinstance(value, slice):
            start = 0 if value.start is None else value.start
            stop, step = value.stop, 1 if value.step is None else value.step
            if not all(isinstance(v, (int, np.integer)) for v in (start, step) + (() if stop is None else (stop,))):
                raise LoopscopeError(f"tokens={value!r}: a slice of token indices takes integers")
            if start < 0 or (stop is not None and stop < 0) or step < 1:
                raise LoopscopeError(f"tokens={value!r}: use non-negative token indices and a positive step")
            if stop is not None and stop <= start:
                raise LoopscopeError(f"tokens={value!r} selects no token; its stop must be past its start")
            return cls(span=slice(int(start), None if stop is None else int(stop), int(step)))
        if isinstance(value, range):
            return cls.parse(slice(value.start, value.stop, value.step))
        if isinstance(value, Sequence) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            if not value:
                raise LoopscopeError("tokens=[] selects no token; list token indices, or use 'all'")
            return cls(indices=frozenset(int(v) for v in value))
        raise LoopscopeError(f"tokens={value!r} is not one of {', '.join(_NAMED)}, a slice, or a list of token indices")

    @property
    def everything(self) -> bool:
        """Every token is stored (the default): :meth:`keep` is None whatever it is given."""
        return self.named == "all"

    def keep(self, prompt: int, indices: np.ndarray) -> np.ndarray | None:
        """Indices (into this forward's tokens) to store; None means every token. ``prompt``: the run's tokens
        before this index were given, those from it on generated; ``indices``: the run's indices of this forward's
        tokens."""
        if self.named == "all":
            return None
        if self.named is not None:
            mask = indices >= prompt if self.named == "generated" else indices < prompt
            return None if mask.all() else np.flatnonzero(mask)
        if self.span is not None:
            s = self.span
            mask = (indices >= s.start) & ((indices - s.start) % s.step == 0)
            if s.stop is not None:
                mask &= indices < s.stop
        else:
            mask = np.isin(indices, sorted(self.indices or ()))
        return None if mask.all() else np.flatnonzero(mask)

    def describe(self) -> str:
        if self.named is not None:
            return self.named
        if self.span is not None:
            s = self.span
            return f"token indices {s.start}:{'' if s.stop is None else s.stop}:{s.step}"
        return "token indices " + ",".join(str(p) for p in sorted(self.indices or ()))


MAX_STEP_STRIDE = 1 << 20


def check_stride(step_stride) -> int:
    if isinstance(step_stride, bool) or not isinstance(step_stride, (int, np.integer)) or step_stride < 1:
        raise LoopscopeError(f"step_stride={step_stride!r} must be a positive integer (1 keeps every iteration)")
    if step_stride > MAX_STEP_STRIDE:  # the reader refuses larger strides as damage (storage/safety.py)
        raise LoopscopeError(f"step_stride={step_stride!r} is over {MAX_STEP_STRIDE}; pass a smaller stride")
    return int(step_stride)


def check_stride_for(step_stride: int, adapter: LoopAdapter) -> None:
    if step_stride > 1 and any(spec.inner_steps for spec in adapter.loops):
        raise LoopscopeError(
            f"step_stride={step_stride} cannot be combined with the nested loops of {adapter.family} "
            "(their (outer, inner) labels need every step); use step_stride=1 or tokens= to save space"
        )


def slot_of(step: int, last: int, stride: int) -> int | None:
    """Where iteration ``step`` is stored when the token ran ``last`` iterations: every ``stride``-th iteration,
    plus the last one in the slot after; None when it is not stored."""
    if step % stride == 0:
        return step // stride
    if step == last:
        return step // stride + 1
    return None
