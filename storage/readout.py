"""The model's final norm, stored with a capture and applied on read, so analysis can measure states in the space
the model reads them out in (the paper's plots) as well as in the raw state space. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CaptureFileError

#: How far one model's norm parameters may differ between two captures (or a capture and its checkpoint): the
#: rounding of a model run in bfloat16 or float16 (bf16 keeps 8 bits of mantissa), no more.
LOW_PRECISION_RTOL = 2**-7
LOW_PRECISION_ATOL = 1e-6


@dataclass(frozen=True)
class ReadoutNorm:
    """The model's final norm (e.g. Huginn's ``ln_f``), so analysis can work in the space the paper plots."""

    kind: str  # "rmsnorm", "layernorm", "identity" (states are read out as they are) or "none" (unknown)
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    weight_offset: float  # 1.0 for norms that scale by (1 + weight), else 0.0

    @classmethod
    def from_params(cls, readout: dict | None) -> ReadoutNorm:
        """The norm a capture stores for ``readout`` (``hooks.metadata.readout_params``), as it reads it back."""
        if not readout:
            return cls("none", None, None, 0.0, 0.0)

        def stored(value):
            return None if value is None else np.asarray(value, dtype=np.float32).astype(np.float64)

        return cls(
            str(readout["kind"]),
            stored(readout.get("weight")),
            stored(readout.get("bias")),
            float(readout.get("eps", 0.0)),
            float(readout.get("weight_offset", 0.0)),
        )

    def same_as(self, other: ReadoutNorm, *, rounded: bool = False) -> bool:
        """Whether two norms read states out identically: kind, eps, offset and every parameter, exactly; with
        ``rounded``, parameters equal up to :func:`same_parameters`' rounding (one model, captured in bf16 once)."""
        if (self.kind, self.eps, self.weight_offset) != (other.kind, other.eps, other.weight_offset):
            return False
        equal = same_parameters if rounded else np.array_equal
        pairs = ((self.weight, other.weight), (self.bias, other.bias))
        return all((a is None and b is None) or (a is not None and b is not None and equal(a, b)) for a, b in pairs)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Apply the norm over the last axis, in float64 (NaN/Inf states give NaN, silently: analysis flags them)."""
        with np.errstate(all="ignore"):
            return self._apply(np.array(x, dtype=np.float64))  # a copy, which _apply scales in place

    def _apply(self, x: np.ndarray) -> np.ndarray:
        """The norm, in place on ``x``: a block of states is one float64 array, not five (analysis is memory-bound)."""
        if self.kind in ("none", "identity"):
            return x
        for name in ("weight", "bias"):
            value = getattr(self, name)
            if value is not None and value.shape[-1] != x.shape[-1]:
                raise CaptureFileError(
                    f"the stored readout {name} has {value.shape[-1]} entries for states of size {x.shape[-1]}; "
                    "the file is damaged (use space='state')"
                )
        if self.kind == "rmsnorm":
            x *= 1 / np.sqrt(_mean_square(x) + self.eps)
        elif self.kind == "layernorm":
            x -= x.mean(axis=-1, keepdims=True)
            x *= 1 / np.sqrt(_mean_square(x) + self.eps)
        else:
            raise CaptureFileError(f"unknown readout norm kind {self.kind!r}; upgrade loopscope to read this file")
        if self.weight is not None:
            x *= self.weight.astype(np.float64) + self.weight_offset
        if self.bias is not None:
            x += self.bias.astype(np.float64)
        return x


def _mean_square(x: np.ndarray) -> np.ndarray:
    """Mean of squares over the last axis, keeping it: each row's dot with itself (BLAS, no squared temporary)."""
    return np.matmul(x[..., None, :], x[..., :, None])[..., 0] / x.shape[-1]


def same_parameters(a: np.ndarray, b: np.ndarray) -> bool:
    """One model's norm parameters, up to the rounding of a model run in bfloat16 or float16."""
    a, b = np.asarray(a).reshape(-1), np.asarray(b).reshape(-1)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=LOW_PRECISION_RTOL, atol=LOW_PRECISION_ATOL))
