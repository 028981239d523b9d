"""loopscope: record every iteration of a looped-depth language model, analyse it offline.

One added line attaches the recorder::

    cap = loopscope.attach(model, "run.h5", tokenizer=tok)

and ``loopscope.open("run.h5")`` reads the capture back without needing torch.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import CaptureFileError, CaptureWriteError, LoopNotFoundError, LoopscopeError, MergeError
from .notebook import inline_heatmap as _inline_heatmap  # noqa: F401 - registers Jupyter's heatmap; draws nothing yet

if TYPE_CHECKING:
    from .hooks.capture import Capture, attach
    from .storage.reader import CaptureFile

__all__ = [
    "attach",
    "Capture",
    "open",
    "__version__",
    "LoopscopeError",
    "CaptureFileError",
    "CaptureWriteError",
    "LoopNotFoundError",
    "MergeError",
]


def open(path: str | os.PathLike, *, missing: str = "error", **options) -> CaptureFile:  # noqa: A001 - mirrors h5py.File
    """Open a capture file for reading (no torch needed). See :class:`loopscope.storage.reader.CaptureFile`.

    A run file the index links but the run folder lacks is an error; ``missing="skip"`` reads the other runs."""
    from .storage.reader import CaptureFile

    return CaptureFile(path, missing=missing, **options)


def __getattr__(name: str):
    # ``attach`` and ``Capture`` need torch: imported on first use, so ``loopscope.attach`` is the one real function
    # (with its keyword-only options) and ``import loopscope`` stays torch-free for readers.
    if name in ("attach", "Capture"):
        from .hooks import capture

        return getattr(capture, name)
    # Subpackages on first use, so that ``import loopscope`` stays light (analysis and the reader need no torch).
    if name in ("analysis", "hooks", "storage", "cli", "families", "models", "examples"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'loopscope' has no attribute {name!r}")
