"""The detection probe runs no hook but its own, and ``chunks=`` too big for HDF5 is one line, not HDF5's error.

A user's hooks registered before ``attach()`` (a hand-written recorder, a statistics accumulator) and torch's global
module hooks must not see the probe's forwards, and must be there afterwards exactly as they were: same order, same
handles. ``chunks=(tokens, steps)`` makes HDF5 chunks of tokens x steps x hidden size x bytes per value, which the
file's format keeps under 4 GiB.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.modules.module as torch_module
from test_detection import (
    GatedEachIteration,
    Looped,
    LoopedWithBatchNorm,
    SharedNorm,
    TiedCopies,
    TwoBlocks,
    WideEntry,
)
from torch import nn

import loopscope
from loopscope.errors import LoopNotFoundError, LoopscopeError
from loopscope.hooks import detect, probe_forward

H = 8


def _hook_state(model: nn.Module):
    """Every forward hook dictionary of the model's modules and torch's globals: the objects, keys and hooks."""
    state = [
        (name, attr, id(d), list(d.items()))
        for name, module in model.named_modules()
        for attr in probe_forward.MODULE_HOOKS
        if (d := module.__dict__.get(attr)) is not None
    ]
    state += [
        (None, attr, id(d), list(d.items()))
        for attr in probe_forward.GLOBAL_HOOKS
        if (d := getattr(torch_module, attr, None)) is not None
    ]
    return state


def _user_hooks(model: nn.Module, calls: list[str]):
    """On every module a plain, a with_kwargs and an always_call forward hook and a pre-hook of each kind, and the
    global ones: each notes its kind when it fires. Returns the handles."""
    handles = []
    for module in model.modules():
        handles += [
            module.register_forward_pre_hook(lambda m, a: calls.append("pre")),
            module.register_forward_pre_hook(lambda m, a, k: calls.append("pre_kwargs"), with_kwargs=True),
            module.register_forward_hook(lambda m, a, o: calls.append("post")),
            module.register_forward_hook(lambda m, a, k, o: calls.append("post_kwargs"), with_kwargs=True),
            module.register_forward_hook(lambda m, a, o: calls.append("always"), always_call=True),
        ]
    handles += [
        torch_module.register_module_forward_pre_hook(lambda m, a: calls.append("global_pre")),
        torch_module.register_module_forward_hook(lambda m, a, o: calls.append("global_post")),
        torch_module.register_module_forward_hook(lambda m, a, o: calls.append("global_always"), always_call=True),
    ]
    return handles


MODELS = [Looped, TwoBlocks, SharedNorm, WideEntry, TiedCopies, GatedEachIteration, LoopedWithBatchNorm]


@pytest.mark.parametrize("make", MODELS, ids=lambda make: make.__name__)
def test_the_probe_runs_none_of_the_models_hooks_and_puts_them_back(make):
    """Before, each of these hooks fired on the probe's forwards (7 times for a recorder on a 3-step loop)."""
    torch.manual_seed(0)
    model = make()
    expected = detect.probe(model)  # what the probe finds on the model without hooks
    calls: list[str] = []
    handles = _user_hooks(model, calls)
    try:
        before = _hook_state(model)
        adapter = detect.probe(model)
        assert calls == []
        assert _hook_state(model) == before  # the same dictionaries, hooks, ids and order
        assert (adapter.loops, adapter.steps_from) == (expected.loops, expected.steps_from)
        with torch.no_grad():
            model(torch.arange(4).unsqueeze(0))
        assert set(calls) == {"pre", "pre_kwargs", "post", "post_kwargs", "always"} | {
            "global_pre",
            "global_post",
            "global_always",
        }
    finally:
        for handle in handles:
            handle.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class TakesTwoInputs(nn.Module):
    """A probe forward fails: the model needs an argument the probe does not pass."""

    def __init__(self):
        super().__init__()
        self.embed, self.block = nn.Embedding(16, H), nn.Linear(H, H)

    def forward(self, ids, mask):
        return self.block(self.embed(ids) * mask)


def test_hooks_come_back_when_the_probe_fails(tmp_path):
    """Without its hooks and then with them (in case they do the model's work), the forward fails: one line, and
    every hook is back as it was."""
    model = TakesTwoInputs()
    calls: list[str] = []
    handles = _user_hooks(model, calls)
    try:
        before = _hook_state(model)
        with pytest.raises(LoopNotFoundError, match=r"the probe forward failed \(TypeError: .*\); pass loop="):
            loopscope.attach(model, tmp_path / "f.h5")
        assert _hook_state(model) == before
    finally:
        for handle in handles:
            handle.remove()
    assert not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class NeedsItsHook(nn.Module):
    """A model that runs only with its own pre-hook, which passes the argument its forward needs (as hooks that
    gather sharded weights do): three iterations of ``block``."""

    def __init__(self):
        super().__init__()
        self.embed, self.block = nn.Embedding(16, H), nn.Sequential(nn.Linear(H, H), nn.Tanh())
        self.register_forward_pre_hook(lambda m, args, kwargs: (args, {**kwargs, "scale": 0.5}), with_kwargs=True)

    def forward(self, ids, scale):
        h = self.embed(ids) * scale
        for _ in range(3):
            h = self.block(h)
        return h


def test_a_model_that_needs_its_hooks_is_probed_with_them(tmp_path):
    model = NeedsItsHook()
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        plain = model(ids)
    with loopscope.attach(model, tmp_path / "n.h5") as capture:
        with torch.no_grad():
            assert torch.equal(model(ids), plain)
    assert capture.adapter.loops[0].exit == "block"
    with loopscope.open(tmp_path / "n.h5") as f:
        assert f.runs[0].num_steps.tolist() == [3, 3, 3]


def test_a_recorder_registered_before_attach_sees_only_the_users_forwards(tmp_path):
    """A hand-written recorder on the loop's block, registered first, gets exactly the steps of
    the user's forward, equal to what the capture stores."""
    torch.manual_seed(0)
    model = Looped(steps=3)
    seen: list[torch.Tensor] = []
    handle = model.block.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    ids = torch.randint(0, 16, (1, 5))
    try:
        with loopscope.attach(model, tmp_path / "r.h5") as cap:
            assert seen == []  # before: 7 entries from the probe's two forwards
            with torch.no_grad():
                model(ids)
    finally:
        handle.remove()
    assert cap.adapter.loops[0].exit == "block" and len(seen) == 3
    with loopscope.open(tmp_path / "r.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].states()[:, 1:], torch.stack(seen, dim=2)[0].numpy())


@pytest.mark.parametrize(
    ("chunks", "dtype"),
    [((10**6, 10**4), "keep"), ((2**16, 2**15), "bfloat16"), ((2**15, 2**15), "float32"), ((2**62, 2**62), "keep")],
)
def test_chunks_too_big_at_any_hidden_size_are_refused_at_attach(tmp_path, chunks, dtype):
    """Before, attach accepted them; the first forward recorded nothing and a later one raised HDF5's 'chunk size >
    4GB requires H5F_LIBVER_V200'."""
    model = Looped()
    with pytest.raises(LoopscopeError, match=r"chunks=\(\d+, \d+\) is too big: .* must stay under 4 GiB") as info:
        loopscope.attach(model, tmp_path / "c.h5", chunks=chunks, dtype=dtype)
    assert "\n" not in str(info.value) and "e.g. (64, 4)" in str(info.value)
    assert not (tmp_path / "c.h5").exists()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_chunks_within_the_limit_at_attach_still_capture(tmp_path):
    """The bound is tokens x steps x 2 bytes at attach (dtype="keep": float16 is the narrowest): (2**15, 2**15)
    passes there, and chunks that fit the states are used as given."""
    torch.manual_seed(0)
    model = Looped()
    loopscope.attach(model, tmp_path / "ok.h5", chunks=(2**15, 2**15), dtype="float16").close()
    with loopscope.attach(model, tmp_path / "c.h5", chunks=(4, 2)):
        with torch.no_grad():
            model(torch.arange(5).unsqueeze(0))
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert capture.runs[0].states().shape == (5, 4, H)


def test_chunk_bytes_check_counts_the_hidden_size_and_dtype():
    """What the recorder checks at a loop's first state, once the width and the stored dtype are known."""
    from loopscope.hooks.options import check_chunk_bytes

    check_chunk_bytes((2**14, 2**13 - 1), H, 4)  # just under 4 GiB
    with pytest.raises(LoopscopeError, match=r"these are 4 GiB for states 8 wide; .* under 134217728, e\.g\."):
        check_chunk_bytes((2**14, 2**13), H, 4)
    check_chunk_bytes((2**14, 2**13), H, 2)  # the same chunks in bfloat16 are 2 GiB


def test_chunks_too_big_for_the_states_are_one_line_at_the_first_forward(tmp_path):
    """(2**14, 2**14) passes at attach (2 GiB at 1 wide in float16), but the states are 8 wide in float32: the
    first forward raises one line naming the option, before any HDF5 dataset is made."""
    torch.manual_seed(0)
    model = Looped()
    ids = torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        plain = model(ids)
    cap = loopscope.attach(model, tmp_path / "c.h5", chunks=(2**14, 2**14))
    too_big = r"chunks=\(16384, 16384\) is too big: .* 8 GiB for states 8 wide"
    with pytest.raises(LoopscopeError, match=too_big) as info, pytest.warns(RuntimeWarning, match="closed the capture"):
        with torch.no_grad():
            model(ids)
    assert "\n" not in str(info.value) and "H5F_LIBVER" not in str(info.value)
    cap.close()
    with torch.no_grad():
        assert torch.equal(model(ids), plain)  # hooks gone, the model as it was
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
