"""The detection probe's forward: one that leaves the model, its hooks and the caller's random streams as they were.

``hooks/detect.py`` runs the model briefly (once, and again to confirm the iteration count) with counting hooks of
its own. Nothing else may see those forwards: the hooks already on the model (a user's recorder, another
capture's, a statistics accumulator) and torch's global module hooks are set aside while the probe runs and put
back afterwards, the very dictionaries, so every hook keeps its place and its handle. What a model keeps in its own
attributes (a call counter in its forward) is its own business and may still change.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.modules.module as torch_module
from torch import nn

#: A module's forward hook dictionaries (the ``with_kwargs`` / ``always_call`` sets are bookkeeping keyed by id).
MODULE_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)
#: torch's hooks on every module (``register_module_forward_hook`` and friends), module globals of torch.
GLOBAL_HOOKS = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_hooks_always_called",
)


@contextmanager
def hooks_set_aside(model: nn.Module) -> Iterator[bool]:
    """Every forward hook of ``model``'s modules and torch's global module hooks out of the way (empty dictionaries
    in their place) until the block ends, however it ends; yields whether there were any. Hooks registered inside
    the block go into the stand-ins and are dropped with them."""
    held = [
        (module, name, module.__dict__[name])
        for module in model.modules()
        for name in MODULE_HOOKS
        if name in module.__dict__
    ]
    held_globals = [(name, getattr(torch_module, name)) for name in GLOBAL_HOOKS if hasattr(torch_module, name)]
    try:
        for module, name, hooks in held:
            module.__dict__[name] = type(hooks)()
        for name, hooks in held_globals:
            setattr(torch_module, name, type(hooks)())
        yield any(hooks for *_, hooks in held) or any(hooks for _, hooks in held_globals)
    finally:
        for module, name, hooks in held:
            module.__dict__[name] = hooks
        for name, hooks in held_globals:
            setattr(torch_module, name, hooks)


def run(model: nn.Module, ids: torch.Tensor) -> None:
    """One probe forward that leaves the model as it was: no autograd, the RNG restored, and in eval mode (a
    training-mode forward would update batch-norm statistics), each module's own mode put back after. Call it
    within :func:`hooks_set_aside`."""
    # every GPU the model computes on: a random s0 or dropout on any of them draws from that GPU's generator
    devices = sorted({t.device.index for t in (ids, *model.parameters(), *model.buffers()) if t.is_cuda})
    modes = [(module, module.training) for module in model.modules()]
    generators = random.getstate(), np.random.get_state()  # a model may draw from Python's or numpy's too
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            try:
                model(input_ids=ids)
            except TypeError:  # plain nn.Modules take the ids positionally
                model(ids)
    finally:
        for module, training in modes:
            module.training = training
        random.setstate(generators[0])
        np.random.set_state(generators[1])


def probe_ids(model: nn.Module) -> torch.Tensor:
    """A few token ids on the device of the model's first (not offloaded) parameter."""
    device = torch.device("cpu")
    for param in model.parameters():
        if param.device.type != "meta":  # offloaded (accelerate) weights live on meta; their hooks move the inputs
            device = param.device
            break
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    return torch.arange(4, device=device).remainder(vocab).unsqueeze(0)
