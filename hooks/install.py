"""Putting hooks and method wrappers on a model, and taking every one of them off again.

Two mechanisms, each where only it works: torch forward (pre-)hooks on modules (the loop's exit and entry, signal
modules, the model itself; the entry's only while it is needed), and wrappers around model methods that run
without a module call of their own (``forward`` as called directly, ``generate``, a family's entry and call
methods). Several captures may wrap one model; each removes only its own, in any order.

What is recorded is what the model passes on: s0 as the loop's entry module receives it and each step as its exit
module returns it, after every other hook on those modules, a user's steering hook included. Torch runs a module's
hooks in the order they were registered, so the hooks that read states are put back behind any hook registered
after them when a forward begins (:meth:`Installed.keep_last`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from torch import nn

from ..errors import LoopscopeError


class NotCopied:
    """Base of the objects whose bound methods are the hooks a capture puts on a model. Copying the model
    (``copy.deepcopy``, ``torch.save(model)``) reaches them first, through the model's own hooks: a copy would
    record into the original's capture (its wrappers call the original model), and the copy's threads and locks
    cannot be copied at all; so the attempt is one line instead. ``state_dict()`` and ``save_pretrained`` copy no
    hook and keep working."""

    def __deepcopy__(self, memo) -> NoReturn:
        raise LoopscopeError(
            "a model with a loopscope capture attached cannot be copied or pickled: close the capture "
            "(cap.close()) before copying or saving the model object; attach again to the copy"
        )

    def __reduce_ex__(self, protocol) -> NoReturn:
        self.__deepcopy__(None)

    def __reduce__(self) -> NoReturn:
        self.__deepcopy__(None)


class Switchable:
    """A forward pre-hook that is on its module only while it is needed. A module with any hook takes torch's
    slower call path at every call, and a loop's entry module is called at every step while s0 is read once per
    forward: its hook is put on when a forward begins and taken off once it has read s0. Put on, it is registered
    anew, so it runs after the module's other pre-hooks and s0 is what the module itself receives."""

    def __init__(self, module: nn.Module, hook: Callable):
        self.module = module
        self.hook = hook
        self._handle: Any = None

    def on(self) -> None:
        self.off()  # still on when a forward did not read s0 (the first one after attach): behind later hooks again
        self._handle = self.module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def off(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Installed:
    """The hooks and method wrappers one capture put on ``model``."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._handles: list[Any] = []
        self._switchable: list[Switchable] = []
        self._last: list[list[Any]] = []  # [module, hook, handle] of the hooks kept behind all others
        self._wrappers: list[tuple[str, Any]] = []

    def before(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args, kwargs)`` before each call of ``module``."""
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def before_while_on(self, module: nn.Module, hook: Callable) -> Switchable:
        """``hook(module, args, kwargs)`` before each call of ``module`` while the switch returned is on (it is)."""
        switch = Switchable(module, hook)
        switch.on()
        self._switchable.append(switch)
        return switch

    def after(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> None:
        """``hook(module, args, output)`` (or ``(module, args, kwargs, output)``) after each call of ``module``."""
        self._handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))

    def after_all(self, module: nn.Module, hook: Callable) -> None:
        """``hook(module, args, output)`` after each call of ``module``, behind its other forward hooks: those
        registered later are passed again by :meth:`keep_last`, so ``output`` is what the module passes on."""
        hook._loopscope_last = True  # type: ignore[attr-defined]
        self._last.append([module, hook, module.register_forward_hook(hook)])

    def keep_last(self) -> None:
        """Put each :meth:`after_all` hook back behind any hook registered after it (at a forward's start). Other
        such hooks (several captures of one model) may stay behind it: they only read."""
        for entry in self._last:
            module, hook, handle = entry
            hooks = module._forward_hooks
            for hook_id in reversed(hooks):
                if hook_id == handle.id:
                    break
                if not getattr(hooks[hook_id], "_loopscope_last", False):
                    handle.remove()
                    entry[2] = module.register_forward_hook(hook)
                    break

    def wrap_method(self, name: str, call: Callable) -> None:
        """Replace ``model.<name>`` by an instance attribute that routes through ``call(original, ...)``.

        The wrapper keeps ``__wrapped__`` so ``inspect.signature`` (used by transformers to check generate's
        kwargs) still sees the original signature. It reads ``__wrapped__`` at each call, so that when several
        captures wrap one model, the one closed first can unlink itself from the chain (:meth:`remove`).
        """
        original = getattr(self.model, name, None)
        if not callable(original):
            return

        def wrapper(*args, **kwargs):
            return call(wrapper.__wrapped__, *args, **kwargs)

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        # what to put back: an attribute, or none
        wrapper._loopscope_had_instance_attr = name in vars(self.model)  # type: ignore[attr-defined]
        setattr(self.model, name, wrapper)
        self._wrappers.append((name, wrapper))

    def remove(self) -> None:
        """Take off every hook and wrapper; safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for _, _, handle in self._last:
            handle.remove()
        self._last.clear()
        for switch in self._switchable:
            switch.off()
        self._switchable.clear()
        for name, wrapper in reversed(self._wrappers):
            top: Any = vars(self.model).get(name)
            if top is wrapper:
                if wrapper._loopscope_had_instance_attr:
                    setattr(self.model, name, wrapper.__wrapped__)
                else:
                    vars(self.model).pop(name, None)
                continue
            # Wrapped again after us. By a later capture: unlink ours from the chain, the later one inheriting
            # what ours wraps. By anything else: ours stays, and passes calls straight through (we are closed).
            above: Any = top
            while hasattr(above, "_loopscope_had_instance_attr") and above.__wrapped__ is not wrapper:
                above = above.__wrapped__
            if hasattr(above, "_loopscope_had_instance_attr"):
                above.__wrapped__ = wrapper.__wrapped__
                above._loopscope_had_instance_attr = wrapper._loopscope_had_instance_attr
        self._wrappers.clear()
