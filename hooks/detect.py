"""Finding the loop: a ``loop=`` override, then the known families, then a probe forward.

The probe runs one tiny forward (RNG state saved and restored, no grad, the model's own and torch's global forward
hooks set aside: see ``probe_forward.py``) with counting hooks on every module. A *unit* is one module instance, or
several instances that share all their parameter storage and type (ALBERT-style blocks written as tied copies, each
called once). Among the outermost units that return a float state, the calls form a sequence such as
``embed? a b a b a b head?``; its longest run of a repeated pattern (the shortest pattern when lengths tie) is the
loop: the pattern's repetitions are the iterations, its last unit is the exit (its output is the state), and the
first unit whose input has the state's width gives s0. When an integer in the model's config (or on the model
itself) equals the iteration count, a second probe with that value plus one confirms that it sets the count, and
the file says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .. import families
from ..errors import LoopNotFoundError
from ..families.adapter import LoopAdapter, LoopSpec
from . import probe_forward
from .user_frames import user_stacklevel

#: Joins the members of a tied-copies unit in ``LoopSpec.exit``: each member's call is the next iteration.
TIED = "|"


def resolve_adapter(model: nn.Module, loop: str | Sequence[str] | LoopAdapter | None = None) -> LoopAdapter:
    """The loop adapter for ``model``: from ``loop=``, a known family, or a probe forward."""
    if isinstance(loop, LoopAdapter):
        for spec in loop.loops:
            _check_path(model, spec.exit)
        return loop
    if loop is not None:
        paths = [loop] if isinstance(loop, str) else list(loop) if isinstance(loop, Iterable) else []
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise LoopNotFoundError(
                f"loop={loop!r} is not a module path; pass a dotted module path such as 'model.layers.3' (or a list)"
            )
        specs = []
        for path in paths:
            _check_path(model, path)
            specs.append(LoopSpec(name=_loop_name(path, len(paths)), exit=path))
        exits = [id(model.get_submodule(path.split(TIED)[-1])) for path in paths]
        if len(set(exits)) < len(paths) or len({spec.name for spec in specs}) < len(specs):
            raise LoopNotFoundError(
                f"loop={loop!r} names one module twice (a path given twice, or two paths of one shared module): "
                "each call would be two loops' iteration; name each loop once"
            )
        return LoopAdapter(family="custom", loops=tuple(specs), steps_from="loop= override")
    return families.match(model) or probe(model)


def _loop_name(path: str, how_many: int) -> str:
    return "core" if how_many == 1 else path.split(TIED)[0].replace(".", "_")


def _check_path(model: nn.Module, path: str) -> None:
    for part in path.split(TIED):  # tied copies: every member must exist
        _check_one_path(model, part)


def _check_one_path(model: nn.Module, path: str) -> None:
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


class _Unit:
    """One module, or tied copies of one: its calls across all members, and the state widths it sees."""

    def __init__(self, members: list[str]):
        self.members = members
        self.calls: list[tuple[int, int, str]] = []  # (start, end, member) per call, in call order
        self.in_width: int | None = None
        self.out_width: int | None = None
        self.inputs: dict[int, torch.Tensor] = {}  # call start -> its first tensor argument (held: no address reuse)
        self.outputs: dict[int, torch.Tensor] = {}  # call start -> the state it returned

    @property
    def label(self) -> str:
        tied = f", tied copies {TIED.join(self.members)}" if len(self.members) > 1 else ""
        return f"{self.members[0]} (x{len(self.calls)}{tied})"

    def path(self) -> str:
        """The exit path: members in the order they ran (one member, or ``a|b|c`` for tied copies)."""
        order = list(dict.fromkeys(member for _, _, member in self.calls))
        return TIED.join(order + [m for m in self.members if m not in order])

    def first_member(self) -> str:
        return self.calls[0][2]


class _ProbeForwardFailed(LoopNotFoundError):
    """The probe's forward raised (rather than ran and showed no loop)."""


def probe(model: nn.Module, input_ids: torch.Tensor | None = None) -> LoopAdapter:
    """Run one small forward and find the modules (or tied copies) entered more than once. The model's own forward
    hooks and torch's global ones are set aside meanwhile: no hook but the probe's sees its forwards. A model that
    cannot run without its hooks (they gather sharded weights, say) is probed again with them in place."""
    ids = input_ids if input_ids is not None else probe_forward.probe_ids(model)
    with probe_forward.hooks_set_aside(model) as had_hooks:
        try:
            return _probe(model, ids)
        except _ProbeForwardFailed:
            if not had_hooks:
                raise
    return _probe(model, ids)


def _probe(model: nn.Module, ids: torch.Tensor) -> LoopAdapter:
    units, unit_of = _units(model)
    clock = [0]
    open_calls: dict[str, list[int]] = {}

    def make_hooks(name):
        unit = units[unit_of[name]]

        def pre(module, args, kwargs):
            clock[0] += 1
            open_calls.setdefault(name, []).append(clock[0])
            first = args[0] if args else next(iter(kwargs.values()), None)
            if isinstance(first, torch.Tensor):
                unit.inputs[clock[0]] = first
            if unit.in_width is None:
                unit.in_width = _width(first)

        def post(module, args, output):
            clock[0] += 1
            start = open_calls[name].pop()
            unit.calls.append((start, clock[0], name))
            state = output[0] if isinstance(output, (tuple, list)) and output else output
            unit.out_width = _width(state)
            if isinstance(state, torch.Tensor):
                unit.outputs[start] = state

        return pre, post

    handles = []
    for name, module in model.named_modules():
        if name in unit_of:
            pre, post = make_hooks(name)
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(module.register_forward_hook(post))
    try:
        probe_forward.run(model, ids)
    except Exception as exc:
        raise _ProbeForwardFailed(
            f"could not find the loop of {type(model).__name__}: the probe forward failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass loop='dotted.module.path'"
        ) from None
    finally:
        for handle in handles:
            handle.remove()

    for unit in units.values():
        unit.calls.sort()
    repeated = [u for u in units.values() if len(u.calls) > 1]
    outermost = [u for u in repeated if not any(o is not u and _inside(u, o) for o in repeated)]
    outermost.sort(key=lambda u: u.calls[0][0])
    considered = ", ".join(u.label for u in outermost) or "none entered more than once"
    name = type(model).__name__
    candidates = [u for u in outermost if u.out_width is not None]
    if not candidates:
        raise LoopNotFoundError(
            f"no loop found in {name}: no module that returns a state is entered more than once per forward "
            f"(considered: {considered}); pass loop='dotted.module.path' if the model loops another way"
        )

    found = _repeating_run(_call_sequence(candidates), name, considered)
    if found is None:
        raise LoopNotFoundError(
            f"no loop found in {name}: modules repeat, but not one after another ({considered}); "
            "pass loop='dotted.module.path'"
        )
    pattern, reps = found
    # the state is what the next iteration reads: the last unit of the pattern whose output it is (a gate or a
    # readout head run on each iteration's state comes after the block, but nothing reads it next time round)
    carriers = [u for u in pattern if pattern.count(u) == 1 and _feeds_next_iteration(u, pattern, reps)]
    exit_unit = carriers[-1] if carriers else pattern[-1]
    if pattern.count(exit_unit) > 1 or len(exit_unit.calls) != reps:
        raise LoopNotFoundError(
            f"ambiguous loop in {name}: the repeating pattern {_names(pattern)} runs {reps} times but ends in "
            f"{exit_unit.members[0]}, which runs {len(exit_unit.calls)} times in all ({considered}); "
            "pass loop= with the module whose one call is one iteration"
        )
    inner = _repeating_run(pattern, name, considered)
    if inner is not None:  # an iteration that itself repeats a stretch back to back: a loop inside the loop
        raise LoopNotFoundError(
            f"nested loops in {name}: each of the {reps} iterations of {_names(pattern)} runs "
            f"{_names(inner[0])} {inner[1]} times; pass loop=[outer, inner] with the two exit modules "
            "to record both (one loop each)"
        )
    hidden = exit_unit.out_width
    entry, channels = exit_unit, None
    for unit in pattern:  # the first unit of an iteration that reads the state (or the state plus more, as Huginn)
        if len(unit.calls) != reps * pattern.count(unit):
            continue  # also called outside the loop: its first call would not be the first iteration's
        if hidden is None:
            break
        if unit.in_width == hidden:
            entry = unit
            break
        if unit.in_width and unit.in_width > hidden and unit.in_width % hidden == 0:
            entry, channels = unit, hidden
            break
    exit_path = exit_unit.path()
    if not carriers:
        warnings.warn(
            f"loopscope: {exit_path} repeats {reps} times in {name}, but what it returns is not what the next "
            "repetition reads (the model may add a residual outside it, or not loop at all); check the loop with "
            "`loopscope info`, or pass loop='dotted.module.path'",
            stacklevel=user_stacklevel(),
        )
    steps_from = _confirm_count(model, ids, exit_unit, reps) or f"probe forward: {reps} iterations"
    return LoopAdapter(
        family="detected",
        loops=(LoopSpec(name="core", exit=exit_path, entry=entry.first_member(), entry_channels=channels),),
        steps_from=steps_from,
        notes=(
            f"found by a probe forward: iteration = {_names(pattern)}, {reps} times; candidates: {considered}",
            *(
                ("tied copies (shared parameter storage) count as one block: each member's call is the next iteration",)
                if TIED in exit_path
                else ()
            ),
        ),
    )


def _units(model: nn.Module) -> tuple[dict[str, _Unit], dict[str, str]]:
    """Group the model's called modules into units: a module alone, or tied copies sharing all parameters."""
    named = [
        (name, module)
        for name, module in model.named_modules()
        if name and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
    ]
    by_key: dict[tuple, list[str]] = {}
    for name, module in named:
        params = [_storage_key(p) for p in module.parameters()]
        if params:
            by_key.setdefault((type(module), frozenset(params), len(params)), []).append(name)
    units: dict[str, _Unit] = {}
    unit_of: dict[str, str] = {}
    for name, _ in named:
        if name in unit_of:
            continue
        members = [name]
        for group in by_key.values():
            if name in group:
                for other in group:  # copies are unrelated instances (a module and its only child share parameters)
                    if other not in unit_of and not any(_related(other, m) for m in members):
                        members.append(other)
                break
        units[name] = _Unit(members)
        for member in members:
            unit_of[member] = name
    return units, unit_of


def _storage_key(param: torch.Tensor):
    if param.device.type == "meta":  # offloaded weights have no storage here; the Parameter object itself is shared
        return ("id", id(param))
    return (param.untyped_storage().data_ptr(), param.storage_offset(), tuple(param.shape), tuple(param.stride()))


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _inside(unit: _Unit, other: _Unit) -> bool:
    return any(m.startswith(o + ".") for m in unit.members for o in other.members)


def _feeds_next_iteration(unit: _Unit, pattern: list[_Unit], reps: int) -> bool:
    """Whether each iteration's output of ``unit`` is what a unit of the next iteration reads: the same values,
    alone or as the first or last channels of a wider input (Huginn's adapter reads [state, embedding])."""
    readers = [v for v in pattern if len(v.calls) == reps]
    if len(unit.calls) != reps:
        return False
    for k in range(reps - 1):
        out = unit.outputs.get(unit.calls[k][0])
        if out is None or not any(_reads(v.inputs.get(v.calls[k + 1][0]), out) for v in readers):
            return False
    return True


def _reads(inp, out: torch.Tensor) -> bool:
    if inp is out:
        return True
    if not isinstance(inp, torch.Tensor) or inp.shape[:-1] != out.shape[:-1] or inp.shape[-1] < out.shape[-1]:
        return False
    width = out.shape[-1]
    return torch.equal(inp[..., :width], out) or torch.equal(inp[..., -width:], out)


def _call_sequence(candidates: list[_Unit]) -> list[_Unit]:
    """The candidates' calls in order, leaving out calls made from inside another candidate's call."""
    calls = sorted((start, end, unit) for unit in candidates for start, end, _ in unit.calls)
    sequence, outer_end = [], -1
    for start, end, unit in calls:
        if start > outer_end:
            sequence.append(unit)
            outer_end = end
    return sequence


def _repeating_run(sequence: list[_Unit], name: str, considered: str) -> tuple[list[_Unit], int] | None:
    """The pattern that repeats back to back over the longest stretch of ``sequence`` (shortest pattern on a tie),
    and how many times; None when nothing repeats back to back."""
    best: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (-covered, period) -> [(start, reps)]
    n = len(sequence)
    for period in range(1, n // 2 + 1):
        for start in range(0, n - 2 * period + 1):
            reps = 1
            while start + (reps + 1) * period <= n and all(
                sequence[start + reps * period + i] is sequence[start + i] for i in range(period)
            ):
                reps += 1
            if reps > 1:
                best.setdefault((-reps * period, period), []).append((start, reps))
    if not best:
        return None
    (covered, period), found = min(best.items())
    patterns = {tuple(sequence[s : s + period]) for s, _ in found}
    if len(patterns) > 1:
        runs = "; ".join(f"{_names(list(p))} x{-covered // period}" for p in patterns)
        raise LoopNotFoundError(
            f"ambiguous loop in {name}: several stretches repeat equally long ({runs}); "
            "pass loop= with the module whose one call is one iteration"
        )
    start, reps = found[0]
    return sequence[start : start + period], reps


def _names(pattern: list[_Unit]) -> str:
    return "[" + ", ".join(u.members[0] for u in pattern) + "]"


def _confirm_count(model: nn.Module, ids: torch.Tensor, exit_unit: _Unit, reps: int) -> str | None:
    """Change each integer setting equal to the count by one and probe again: the one the count follows sets it."""
    config = getattr(model, "config", None)
    settings = []
    if config is not None and hasattr(config, "to_dict"):
        settings += [(config, "config", k) for k, v in config.to_dict().items() if type(v) is int and v == reps]
    settings += [
        (model, "model", k) for k, v in vars(model).items() if not k.startswith("_") and type(v) is int and v == reps
    ]
    members = [model.get_submodule(m) for m in exit_unit.members]
    for owner, where, key in settings[:4]:
        count = [0]
        handles = [m.register_forward_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1)) for m in members]
        try:
            setattr(owner, key, reps + 1)
            probe_forward.run(model, ids)
        except Exception:
            continue
        finally:
            setattr(owner, key, reps)
            for handle in handles:
                handle.remove()
        if count[0] == reps + 1:
            return f"{where}.{key} (a probe with {key}={reps + 1} ran {reps + 1} iterations)"
    return None


def _width(value) -> int | None:
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
        return int(value.shape[-1])
    return None
