"""The options of a capture, checked before anything is made, and as the file header records them.

Each option's mistake would otherwise surface mid-forward, from torch, h5py or the tokenizer; here it is one line
naming the option and a value that works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import LoopscopeError
from ..storage import compression as filters
from . import selection

#: ``dtype=`` values: the dtype states are stored in (``"keep"``: as the model computes them).
DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: HDF5 chunks of states stay under this many bytes: the file's format (libver v110) cannot index a chunk of 4 GiB.
CHUNK_BYTES_LIMIT = 1 << 32
#: Bytes per stored value at the narrowest (float16, bfloat16): what ``dtype="keep"`` may store at attach time.
NARROWEST_ITEMSIZE = 2


def check_chunk_bytes(chunks: tuple[int, int], hidden: int | None, itemsize: int) -> None:
    """A one-line error unless a chunk of ``chunks=(tokens, steps)`` states ``hidden`` wide, ``itemsize`` bytes per
    value, stays under :data:`CHUNK_BYTES_LIMIT`. At attach the width is not known (``hidden=None``: chunks too big
    at a width of 1 are too big at any); the recorder checks again at a loop's first state, with its width."""
    tokens, steps = (int(n) for n in chunks)
    size = tokens * steps * (hidden or 1) * itemsize
    if size < CHUNK_BYTES_LIMIT:
        return
    most = (CHUNK_BYTES_LIMIT - 1) // ((hidden or 1) * itemsize)
    gib = f"{size / (1 << 30):.3g} GiB"
    what = f"{gib} at any hidden size" if hidden is None else f"{gib} for states {hidden} wide"
    raise LoopscopeError(
        f"chunks=({tokens}, {steps}) is too big: an HDF5 chunk of states (tokens x steps x hidden size x "
        f"{itemsize} bytes) must stay under 4 GiB, and these are {what}; pass chunks whose tokens x steps is "
        f"{'well ' if hidden is None else ''}under {most + 1}, e.g. (64, 4)"
    )


@dataclass(frozen=True)
class CaptureOptions:
    """What :func:`loopscope.attach` was asked for (see its docstring for each option), checked."""

    tokenizer: Any
    mode: str
    dtype: str
    buffer_mb: float
    compression: str | None
    chunks: tuple[int, int] | None
    locking: bool | str | None
    tokens: selection.TokenSelection
    step_stride: int

    @classmethod
    def check(cls, *, tokenizer, mode, dtype, buffer_mb, compression, chunks, locking, tokens, step_stride):
        if dtype not in DTYPES:
            raise LoopscopeError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        if isinstance(buffer_mb, bool) or not isinstance(buffer_mb, (int, float)) or not 0 < buffer_mb < float("inf"):
            raise LoopscopeError(f"buffer_mb={buffer_mb!r} must be a positive number of MiB, e.g. 64")
        if chunks is not None:
            parts = tuple(chunks) if isinstance(chunks, (tuple, list)) else ()
            if len(parts) != 2 or not all(
                isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0 for n in parts
            ):
                raise LoopscopeError(f"chunks={chunks!r} must be (tokens, steps): two positive integers, e.g. (64, 4)")
            stored = DTYPES[dtype]  # too big already at a hidden size of 1 is too big for any (the rest: first state)
            check_chunk_bytes(parts, None, stored.itemsize if stored is not None else NARROWEST_ITEMSIZE)
        if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
            raise LoopscopeError(
                f"tokenizer= needs a decode() method (a transformers tokenizer); {type(tokenizer).__name__} has none"
            )
        filters.check(compression)  # an unknown filter or a missing plugin fails before any file is made
        return cls(
            tokenizer=tokenizer,
            mode=mode,
            dtype=dtype,
            buffer_mb=buffer_mb,
            compression=compression,
            chunks=tuple(chunks) if chunks else None,
            locking=locking,
            tokens=selection.TokenSelection.parse(tokens),  # bad options fail before the probe forwards
            step_stride=selection.check_stride(step_stride),
        )

    @property
    def cast(self) -> torch.dtype | None:
        return DTYPES[self.dtype]

    def describe(self) -> dict[str, Any]:
        """The options as the file header stores them."""
        return {
            "mode": self.mode,
            "dtype": self.dtype,
            "buffer_mb": self.buffer_mb,
            "compression": self.compression,
            "chunks": list(self.chunks) if self.chunks else None,
            "tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else None,
            "tokens": self.tokens.describe(),
            "step_stride": self.step_stride,
        }
