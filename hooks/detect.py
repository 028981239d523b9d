"""Finding the loop: a ``loop=`` override, then the known families, then a probe forward.

The probe runs one tiny forward with counting hooks on every module (RNG state saved and restored, no grad), and
looks for the outermost modules entered more than once. Their common call count is the iteration count; the last
of them to run in an iteration is the exit (its output is the state), the first one's input is s0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..storage.errors import LoopNotFoundError
from .adapters import KNOWN_FAMILIES, LoopAdapter, LoopSpec


def resolve_adapter(model: nn.Module, loop: str | Sequence[str] | LoopAdapter | None = None) -> LoopAdapter:
    """The loop adapter for ``model``: from ``loop=``, a known family, or a probe forward."""
    if isinstance(loop, LoopAdapter):
        for spec in loop.loops:
            _check_path(model, spec.exit)
        return loop
    if loop is not None:
        paths = [loop] if isinstance(loop, str) else list(loop)
        if not paths:
            raise LoopNotFoundError("loop= is empty; pass a dotted module path such as 'model.layers.3'")
        specs = []
        for path in paths:
            _check_path(model, path)
            specs.append(LoopSpec(name=_loop_name(path, len(paths)), exit=path))
        return LoopAdapter(family="custom", loops=tuple(specs), steps_from="loop= override")
    for family in KNOWN_FAMILIES:
        adapter = family(model)
        if adapter is not None:
            return adapter
    return probe(model)


def _loop_name(path: str, how_many: int) -> str:
    return "core" if how_many == 1 else path.replace(".", "_")


def _check_path(model: nn.Module, path: str) -> None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = [n for n in names if path.split(".")[-1] in n.split(".")][:5] or names[:5]
        raise LoopNotFoundError(
            f"loop={path!r}: no such module in {type(model).__name__}; modules like it: {', '.join(close)}"
        ) from None
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        last = f"{path}.{list(module._modules)[-1]}" if len(module) else path
        raise LoopNotFoundError(
            f"loop={path!r} is a {type(module).__name__}, which is never called itself; "
            f"point loop= at the block that ends an iteration, e.g. {last!r}"
        )


def probe(model: nn.Module, input_ids: torch.Tensor | None = None) -> LoopAdapter:
    """Run one small forward and find the modules entered more than once."""
    calls: dict[str, list[int]] = {}
    widths: dict[str, tuple[int | None, int | None]] = {}
    clock = [0]
    handles = []

    def make_hooks(name):
        def pre(module, args, kwargs):
            clock[0] += 1
            calls.setdefault(name, []).append(clock[0])
            first = args[0] if args else next(iter(kwargs.values()), None)
            widths.setdefault(name, (_width(first), None))

        def post(module, args, output):
            clock[0] += 1
            calls[name].append(clock[0])
            state = output[0] if isinstance(output, (tuple, list)) and output else output
            widths[name] = (widths[name][0], _width(state))

        return pre, post

    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        pre, post = make_hooks(name)
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        ids = input_ids if input_ids is not None else _probe_ids(model)
        devices = [ids.device] if ids.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            try:
                model(input_ids=ids)
            except TypeError:  # plain nn.Modules take the ids positionally
                model(ids)
    except Exception as exc:
        raise LoopNotFoundError(
            f"could not find the loop of {type(model).__name__}: the probe forward failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass loop='dotted.module.path'"
        ) from None
    finally:
        for handle in handles:
            handle.remove()

    counts = {name: len(stamps) // 2 for name, stamps in calls.items()}
    repeated = {name for name, n in counts.items() if n > 1}
    outermost = sorted(
        (name for name in repeated if not any(_is_ancestor(other, name) for other in repeated)),
        key=lambda name: calls[name][0],
    )
    # Keep modules that carry a state (same width in and out); utilities such as rotary embeddings do not.
    stateful = [n for n in outermost if widths[n][1] is not None and widths[n][1] == widths[outermost[-1]][1]] if outermost else []
    considered = ", ".join(f"{n} (x{counts[n]})" for n in outermost) or "none entered more than once"
    if not stateful:
        raise LoopNotFoundError(
            f"no loop found in {type(model).__name__}: no module is entered more than once per forward "
            f"(considered: {considered}); pass loop='dotted.module.path' if the model loops another way"
        )
    by_count: dict[int, list[str]] = {}
    for name in stateful:
        by_count.setdefault(counts[name], []).append(name)
    if len(by_count) > 1:
        raise LoopNotFoundError(
            f"ambiguous loop in {type(model).__name__}: modules repeat different numbers of times ({considered}); "
            f"pass loop= with the module whose one call is one iteration"
        )
    group = next(iter(by_count.values()))
    exit_name = max(group, key=lambda n: calls[n][-1])
    entry_name = min(group, key=lambda n: calls[n][0])
    in_width, hidden = widths[entry_name][0], widths[exit_name][1]
    entry_channels = hidden if in_width and hidden and in_width != hidden and in_width % hidden == 0 else None
    if in_width not in (hidden, None) and entry_channels is None:
        entry_name = exit_name
    return LoopAdapter(
        family="detected",
        loops=(LoopSpec(name="core", exit=exit_name, entry=entry_name, entry_channels=entry_channels),),
        steps_from=f"probe forward: {counts[exit_name]} iterations",
        notes=(f"found by a probe forward; candidates: {considered}",),
    )


def _probe_ids(model: nn.Module) -> torch.Tensor:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    return torch.arange(4, device=device).remainder(vocab).unsqueeze(0)


def _is_ancestor(parent: str, child: str) -> bool:
    return child.startswith(parent + ".")


def _width(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
        return int(value.shape[-1])
    return None
