"""The settings a call was given, stored with each of its runs (attribute ``call_arguments``, JSON text).

The model's config is stored once per capture, but much of what decides a run is passed per call: Huginn's
``num_steps`` and ``criterion``, Ouro's ``exit_threshold`` / ``exit_at_step``, sampling settings, a
``generation_config``'s changes. Without them a run cannot be told from one made with the defaults. Only settings
are kept (numbers, text, flags, short lists and dicts of them, one-element CPU tensors as numbers); the inputs are
stored as token data already, and tensors, caches, callables and streamers are left out.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch

#: Inputs, not settings: stored as the run's token data, or not data at all.
INPUTS = frozenset(
    {"input_ids", "inputs_embeds", "attention_mask", "position_ids", "cache_position", "past_key_values", "labels"}
)
MAX_ITEMS = 64  # a longer list is data, not a setting
MAX_TEXT = 1000
MAX_JSON = 16384  # characters in all: an attribute of the run file
MAX_TENSOR = 16  # a CPU tensor of up to this many numbers is a setting (Huginn's num_steps as a tensor)

_LEFT_OUT = object()


def call_arguments(kwargs: dict) -> str:
    """The call's keyword settings as JSON text (an object, keys sorted); ``{}`` when it had none."""
    settings = {}
    for name, value in kwargs.items():
        try:  # someone else's objects: a setting that cannot be read is left out, never the call's failure
            setting = _LEFT_OUT if name in INPUTS else _setting(value, depth=0)
        except Exception:
            setting = _LEFT_OUT
        if setting is not _LEFT_OUT:
            settings[str(name)] = setting
    # an attribute, so bounded: the shortest settings first while they fit (one huge list cannot crowd out the rest)
    sizes = {name: len(json.dumps({name: value}, sort_keys=True)) for name, value in settings.items()}
    kept, size = {}, 2
    for name in sorted(settings, key=sizes.__getitem__):
        size += sizes[name]  # '{"name": value}' minus its braces, plus the ", " joining it to the others
        if size > MAX_JSON:
            break
        kept[name] = settings[name]
    return json.dumps(kept, sort_keys=True, allow_nan=False)


def _setting(value, depth: int):
    """``value`` as JSON-ready data, or ``_LEFT_OUT``. Non-finite floats become text ("nan", "inf") so the JSON
    stays strict; depth is bounded so a self-referencing list cannot recurse forever."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else _LEFT_OUT
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else str(float(value))
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, torch.Tensor):  # dense CPU tensors only: sparse, quantized or nested ones have no list
        plain = value.layout == torch.strided and not (value.is_quantized or value.is_nested or value.is_complex())
        small = plain and value.device.type == "cpu" and value.numel() <= MAX_TENSOR
        return _setting(value.detach().tolist(), depth + 1) if small and depth < 3 else _LEFT_OUT
    if isinstance(value, np.ndarray):
        return _setting(value.tolist(), depth + 1) if value.size <= MAX_TENSOR and depth < 3 else _LEFT_OUT
    if depth >= 3:
        return _LEFT_OUT
    if isinstance(value, (list, tuple)) and len(value) <= MAX_ITEMS:
        items = [_setting(item, depth + 1) for item in value]
        return _LEFT_OUT if any(item is _LEFT_OUT for item in items) else items
    if isinstance(value, dict) and len(value) <= MAX_ITEMS:
        pairs = ((str(key), _setting(item, depth + 1)) for key, item in value.items())
        return {key: item for key, item in pairs if item is not _LEFT_OUT}
    if depth == 0 and callable(getattr(value, "to_diff_dict", None)):  # a GenerationConfig: what it changes
        try:
            changes = value.to_diff_dict()
        except Exception:  # someone else's object: its settings are worth a field, not the call
            return _LEFT_OUT
        return _setting(changes, depth + 1) if isinstance(changes, dict) else _LEFT_OUT
    return _LEFT_OUT
