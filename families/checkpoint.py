"""A checkpoint directory's ``config.json``, read the one way that capture and the readout lens both need: a file
that is not JSON, or JSON that is no object, is one line naming the file instead of an error deep in transformers."""

from __future__ import annotations

import json
import os

from ..errors import LoopscopeError


def read_config(config: str | os.PathLike) -> dict:
    """The parsed ``config.json`` at ``config``; a :class:`LoopscopeError` when it cannot be read or is no object."""
    try:
        with open(config, encoding="utf-8") as handle:
            parsed = json.load(handle)
    except (OSError, ValueError, RecursionError):
        raise LoopscopeError(f"{os.fspath(config)} is not readable JSON; re-save or re-download the model") from None
    if not isinstance(parsed, dict):
        raise LoopscopeError(f"{os.fspath(config)} holds no model configuration; re-save or re-download the model")
    return parsed
