"""Where a warning should point: the user's own line, past the frames of loopscope's hooks, torch and transformers
(a captured call goes through a different number of them each way, so a fixed ``stacklevel`` would land inside)."""

from __future__ import annotations

import inspect
import os
import sys

import torch


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function."""
    packages = [torch, sys.modules.get("transformers")]
    inside = tuple(os.path.dirname(m.__file__) + os.sep for m in packages if m is not None and m.__file__)
    inside += (os.path.dirname(os.path.abspath(__file__)) + os.sep,)  # the hooks package
    level = 1
    here = inspect.currentframe()
    frame = here.f_back if here is not None else None  # the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level
