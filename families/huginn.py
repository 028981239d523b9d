"""Huginn-0125 / Raven (hub remote code), retrofitted-recurrence models and our reference model.

Besides where the loop is, this family has one behaviour of its own: adaptive exit. With ``generate(criterion=...)``
Huginn iterates a batch until every row's criterion holds; rows that exited early keep being iterated with the
others, so the number of loop calls is the batch's depth, not each row's. The evaluator is the one place that knows
when a row exits. :func:`watch_exits` wraps it in :class:`ExitWatcher`, which passes every call through unchanged
(same object state, same return values, so generation is unaffected) and reports each check's decision and
compared value to the capture.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import cast

from torch import nn

from .adapter import LoopAdapter, LoopSpec, has_module, lens_fields

#: generate() kwargs that switch on Huginn's per-iteration exit evaluators (``init(latents)``/``check(...)``).
EXIT_EVALUATOR_KWARGS = ("criterion", "exit_threshold", "exit_evaluator")


def adapter(model: nn.Module) -> LoopAdapter | None:
    """Huginn-0125 / Raven remote code, retrofitted-recurrence models, and our reference model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "mean_recurrence"):
        return None
    if not (has_module(model, "transformer.core_block") and has_module(model, "transformer.adapter")):
        return None
    core = cast(nn.ModuleList, model.get_submodule("transformer.core_block"))
    hidden = getattr(config, "n_embd", None) or config.hidden_size
    return LoopAdapter(
        family="huginn-raven",
        loops=(
            LoopSpec(
                name="core",
                exit=f"transformer.core_block.{len(core) - 1}",
                entry="transformer.adapter",
                entry_channels=int(hidden),
                **lens_fields(
                    model,
                    ("transformer.ln_f", "lm_head"),
                    "the model has no transformer.ln_f or lm_head to read its states out with",
                    lens_head="lm_head.weight",
                    lens_tied="transformer.wte.weight",
                ),
            ),
        ),
        readout="transformer.ln_f" if has_module(model, "transformer.ln_f") else None,
        steps_from="num_steps= forward/generate kwarg, else config.mean_recurrence; with criterion= each row's exit",
        notes=(
            "s0 is the first n_embd channels of transformer.adapter's input at the first iteration",
            "the model ignores attention_mask; it is recorded as the caller passed it",
            "adaptive exit (generate(criterion=...)): a batch iterates until every row exits; num_steps is each "
            "row's own exit step, later stored steps of an exited row are iterations it was carried through",
            "signal exit_value: the exit criterion's value per check, on the last position of each forward",
        ),
        entry_methods=("embed_inputs",),
        call_methods=(
            "forward_with_adaptive_compute",
            "generate_with_adaptive_compute",
            "generate_minimal",
            "generate_speculative",
        ),
        exit_evaluator_kwargs=EXIT_EVALUATOR_KWARGS,
        watch_call=watch_exits,
        coda_method="predict_from_latents" if callable(getattr(model, "predict_from_latents", None)) else None,
    )


def watch_exits(model: nn.Module, args: tuple, kwargs: dict, report: Callable) -> tuple[tuple, dict]:
    """The call's args and kwargs with its exit evaluator wrapped in an :class:`ExitWatcher` that tells ``report``
    each row's exit decision and value; unchanged when the call uses no evaluator we understand."""
    if len(args) > 1 and is_evaluator(args[1]):  # forward_with_adaptive_compute(ids, evaluator)
        return (args[0], ExitWatcher(args[1], report), *args[2:]), kwargs
    if not any(k in kwargs for k in EXIT_EVALUATOR_KWARGS):
        return args, kwargs
    evaluator = evaluator_for(model, kwargs)
    if evaluator is None:
        return args, kwargs
    return args, {**kwargs, "exit_evaluator": ExitWatcher(evaluator, report)}


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
        if isinstance(result, (tuple, list)) and len(result) == 3:  # else the decoding loop says what is wrong
            self.on_check(result[0], result[2])  # any values a user's evaluator returns: read as they can be
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
