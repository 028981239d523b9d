"""What a capture file says about the model it came from: versions, config, loop adapter, readout norm."""

from __future__ import annotations

import datetime as _dt
import platform
from typing import Any

import torch
from torch import nn

from ..families.adapter import LoopAdapter
from . import distributed


def describe(model: nn.Module, adapter: LoopAdapter, options: dict[str, Any]) -> dict[str, Any]:
    """The header written at the root of the capture file."""
    import transformers

    from .._version import __version__

    config = getattr(model, "config", None)
    config_json = None
    if config is not None and hasattr(config, "to_dict"):
        config_json = config.to_dict()
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = ""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loopscope_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "model_dtype": dtype,
        "config": config_json or {},
        "loop": adapter.to_dict(),
        "loops": [spec.name for spec in adapter.loops],
        "options": options,
        **distributed.describe(),  # rank, world_size, local_rank, hostname: which rank wrote this file
    }


def readout_params(model: nn.Module, adapter: LoopAdapter) -> dict[str, Any] | None:
    """Kind, eps and parameters of the adapter's readout norm, or None when it has none we can reproduce."""
    if not adapter.readout:
        return None
    if adapter.readout == "identity":
        return {"kind": "identity", "module": ""}
    module = model.get_submodule(adapter.readout)
    weight, bias = _weight(module, "weight"), _weight(module, "bias")
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    name = type(module).__name__.lower()
    if isinstance(module, nn.LayerNorm) or "layernorm" in name:
        kind = "layernorm"
    elif "rmsnorm" in name or isinstance(module, getattr(nn, "RMSNorm", ())):
        kind = "rmsnorm"
    else:
        return None
    return {
        "kind": kind,
        "module": adapter.readout,
        "eps": float(eps if eps is not None else 1e-6),
        # Gemma-style norms scale by (1 + weight); say so rather than guess at analysis time.
        "weight_offset": 1.0 if getattr(module, "weight_offset", 0.0) == 1.0 or "gemma" in name else 0.0,
        "weight": _as_numpy(weight),
        "bias": _as_numpy(bias),
    }


def _weight(module: nn.Module, name: str):
    """``module.<name>``; for weights offloaded by accelerate (a meta tensor on the module), the copy its hook keeps."""
    param = getattr(module, name, None)
    if isinstance(param, torch.Tensor) and param.device.type == "meta":
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]):  # a SequentialHook holds several
            weights = getattr(h, "weights_map", None)
            if weights is not None and name in weights:
                return weights[name]
    return param


def _as_numpy(param):
    if param is None or not isinstance(param, torch.Tensor):
        return None
    return param.detach().to(device="cpu", dtype=torch.float32).numpy()
