"""Huginn's adaptive exit: learning each row's own exit step from its exit evaluator.

With ``generate(criterion=...)`` Huginn iterates a batch until every row's criterion holds; rows that exited early
keep being iterated with the others, so the number of loop calls is the batch's depth, not each row's. The
evaluator is the one place that knows when a row exits. loopscope wraps it in :class:`ExitWatcher`, which passes
every call through unchanged (same object state, same return values, so generation is unaffected) and reports
each check's decision and compared value to the capture.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn



class ExitWatcher:
    """Wraps an evaluator with Huginn's protocol: ``init(latents)``, ``check(model, latents, aux)`` ->
    ``(exits per row, outputs or None, value per row)``."""

    def __init__(self, evaluator, on_check: Callable):
        self.evaluator = evaluator
        self.on_check = on_check

    def init(self, latents):
        return self.evaluator.init(latents)

    def check(self, model, latents, aux):
        result = self.evaluator.check(model, latents, aux)
        exits, _outputs, values = result
        self.on_check(exits, values)
        return result

    def __getattr__(self, name):  # anything else the decoding loop reads comes from the real evaluator
        return getattr(self.evaluator, name)


def evaluator_for(model: nn.Module, kwargs: dict):
    """The evaluator a ``generate(criterion=..., exit_threshold=...)`` call would build, or the one it was given.

    Built with the factory of the model's own module (``get_adaptive_exit_evaluator``, as in Huginn's code), so
    it is the same evaluator the model would have made. ``None`` when the model's code has no such factory: the
    call then runs unwatched and every row is recorded with the batch's iteration count.
    """
    given = kwargs.get("exit_evaluator")
    if given is not None:
        return given if is_evaluator(given) else None  # not one we understand: the model will say what is wrong
    factory = getattr(sys.modules.get(type(model).__module__), "get_adaptive_exit_evaluator", None)
    if factory is None:
        return None
    return factory(model, kwargs.get("criterion", "none"), kwargs.get("exit_threshold", "auto"))


def is_evaluator(value) -> bool:
    return callable(getattr(value, "check", None)) and callable(getattr(value, "init", None))
