"""Generic loop detection on small hand-written looped models: what the probe picks, and its one-line errors.

Models outside the known families are only recorded correctly if the probe finds the module whose one call is one
iteration; a wrong pick records plausible-looking but wrong states, so every pick is checked against plain hooks.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import loopscope
from loopscope.errors import LoopNotFoundError

H = 8


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Looped(nn.Module):
    """embed -> block x steps -> head; the count is a plain attribute read in forward."""

    def __init__(self, steps=3):
        super().__init__()
        self.steps = steps
        self.embed, self.block, self.head = nn.Embedding(16, H), Block(), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.steps):
            x = self.block(x)
        return self.head(x)


class TwoBlocks(nn.Module):
    """Two different blocks looped together: one iteration is a then b."""

    def __init__(self, steps=4):
        super().__init__()
        self.steps = steps
        self.embed, self.a, self.b, self.head = nn.Embedding(16, H), Block(), Block(), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(self.steps):
            x = self.b(self.a(x))
        return self.head(x)


class SharedNorm(nn.Module):
    """A norm used before and after the loop: entered twice, but it is not the loop."""

    def __init__(self):
        super().__init__()
        self.embed, self.norm, self.block, self.head = nn.Embedding(16, H), nn.LayerNorm(H), Block(), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.norm(self.embed(ids))
        for _ in range(3):
            x = self.block(x)
        return self.head(self.norm(x))


class WideEntry(nn.Module):
    """Huginn's shape: each iteration starts with an adapter reading [state, embedding] (2H -> H)."""

    def __init__(self):
        super().__init__()
        self.embed, self.adapter, self.block, self.head = (
            nn.Embedding(16, H),
            nn.Linear(2 * H, H),
            Block(),
            nn.Linear(H, 16),
        )

    def forward(self, ids):
        e = self.embed(ids)
        x = torch.zeros_like(e) + 0.5
        for _ in range(5):
            x = self.block(self.adapter(torch.cat([x, e], dim=-1)))
        return self.head(x)


class TiedCopies(nn.Module):
    """ALBERT-style sharing written as separate instances: three copies, one Parameter each, each called once."""

    def __init__(self, tied=True):
        super().__init__()
        self.embed, self.head = nn.Embedding(16, H), nn.Linear(H, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        if tied:
            for block in self.blocks[1:]:
                block.lin.weight, block.lin.bias = self.blocks[0].lin.weight, self.blocks[0].lin.bias

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TwoLoops(nn.Module):
    """Two loops one after the other, three iterations each: which one is meant is the user's call."""

    def __init__(self):
        super().__init__()
        self.embed, self.first, self.second, self.head = nn.Embedding(16, H), Block(), Block(), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.first(x)
        for _ in range(3):
            x = self.second(x)
        return self.head(x)


class Nested(nn.Module):
    """An outer step h that runs an inner step l three times first (HRM's shape, without a known config)."""

    def __init__(self):
        super().__init__()
        self.embed, self.outer, self.inner, self.head = nn.Embedding(16, H), Block(), Block(), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(2):
            z = x
            for _ in range(3):
                z = self.inner(z)
            x = self.outer(z)
        return self.head(x)


def _hand_capture(entry: nn.Module, exits: list[nn.Module], channels: int | None = None):
    """Plain hooks: the entry's first input (s0) and every exit call's output, in call order."""
    seen = {"s0": [], "states": []}

    def on_entry(module, args):
        if not seen["s0"]:
            seen["s0"].append(args[0][..., :channels].detach().clone() if channels else args[0].detach().clone())

    handles = [entry.register_forward_pre_hook(on_entry)]
    handles += [m.register_forward_hook(lambda m, a, o: seen["states"].append(o.detach().clone())) for m in exits]
    return seen, handles


def _capture_and_compare(model, path, entry, exits, steps, channels=None):
    """Capture one forward with detection, check logits, steps and every state against the hand-written hooks."""
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        plain = model(ids)
    with loopscope.attach(model, path) as cap:  # the probe runs here, before the hand-written hooks exist
        seen, handles = _hand_capture(entry, exits, channels)
        with torch.no_grad():
            hooked = model(ids)
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, hooked)
    assert len(seen["states"]) == steps
    want = torch.stack(seen["s0"] + seen["states"], dim=2)
    with loopscope.open(path) as capture:
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.token_ids, ids[row].numpy())
            np.testing.assert_array_equal(run.num_steps, [steps] * 5)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
    return cap.adapter


def test_one_block_looped(tmp_path):
    torch.manual_seed(0)
    model = Looped(steps=3)
    adapter = _capture_and_compare(model, tmp_path / "l.h5", model.block, [model.block], 3)
    spec = adapter.loops[0]
    assert (adapter.family, spec.exit, spec.entry, spec.entry_channels) == ("detected", "block", "block", None)
    # the count was confirmed by a second probe with steps=4
    assert adapter.steps_from.startswith("model.steps")


def test_step_count_is_the_models_own(tmp_path):
    """Detection runs once at attach; later forwards record however many iterations they run."""
    torch.manual_seed(0)
    model = Looped(steps=3)
    with loopscope.attach(model, tmp_path / "n.h5"):
        with torch.no_grad():
            model(torch.arange(4).unsqueeze(0))
            model.steps = 6
            model(torch.arange(4).unsqueeze(0))
    with loopscope.open(tmp_path / "n.h5") as capture:
        assert [int(r.num_steps[0]) for r in capture.runs] == [3, 6]


def test_two_blocks_looped_together(tmp_path):
    """The iteration is a then b: b ends it (its output is the state), a's input is s0."""
    torch.manual_seed(0)
    model = TwoBlocks(steps=4)
    adapter = _capture_and_compare(model, tmp_path / "ab.h5", model.a, [model.b], 4)
    assert (adapter.loops[0].exit, adapter.loops[0].entry) == ("b", "a")
    assert "[a, b], 4 times" in adapter.notes[0]


class GatedEachIteration(nn.Module):
    """An exit gate (or a deep-supervision head) run on each iteration's state: it comes last in the repeating
    pattern, but the next iteration reads the block's output, not its own."""

    def __init__(self, side_width=1):
        super().__init__()
        self.embed, self.block, self.side = nn.Embedding(16, H), Block(), nn.Linear(H, side_width)
        self.head = nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(4):
            x = self.block(x)
            self.side(x)
        return self.head(x)


class ResidualOutside(nn.Module):
    """x = x + f(x) in the loop body: the state is no module's output, which the probe can only warn about."""

    def __init__(self):
        super().__init__()
        self.embed, self.f, self.head = nn.Embedding(16, H), nn.Linear(H, H), nn.Linear(H, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = x + self.f(x)
        return self.head(x)


@pytest.mark.parametrize("side_width", [1, 2 * H])
def test_a_side_output_of_each_iteration_is_not_the_state(tmp_path, side_width):
    """Before, the gate (1 wide: stored as the 'state') or the head (2H wide: a raw error mid-forward) was taken
    for the loop's exit."""
    torch.manual_seed(0)
    model = GatedEachIteration(side_width)
    adapter = _capture_and_compare(model, tmp_path / "g.h5", model.block, [model.block], 4)
    assert (adapter.loops[0].exit, adapter.loops[0].entry) == ("block", "block")


def test_a_repeated_module_whose_output_is_not_read_next_is_flagged(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="what it returns is not what the next repetition reads"):
        loopscope.attach(ResidualOutside(), tmp_path / "r.h5").close()


def test_module_entered_outside_the_loop_is_not_the_loop(tmp_path):
    """A norm called before and after the loop repeats too, but not back to back: the block is the loop."""
    torch.manual_seed(0)
    model = SharedNorm()
    adapter = _capture_and_compare(model, tmp_path / "n.h5", model.block, [model.block], 3)
    assert adapter.loops[0].exit == "block" and "norm (x2)" in adapter.notes[0]


def test_wide_entry_gives_s0_from_its_first_channels(tmp_path):
    torch.manual_seed(0)
    model = WideEntry()
    adapter = _capture_and_compare(model, tmp_path / "w.h5", model.adapter, [model.block], 5, channels=H)
    spec = adapter.loops[0]
    assert (spec.exit, spec.entry, spec.entry_channels) == ("block", "adapter", H)


def test_tied_copies_are_one_loop(tmp_path):
    """Separate instances sharing every parameter are one block run three times: found by shared storage."""
    torch.manual_seed(0)
    model = TiedCopies(tied=True)
    adapter = _capture_and_compare(model, tmp_path / "t.h5", model.blocks[0], list(model.blocks), 3)
    assert adapter.loops[0].exit == "blocks.0|blocks.1|blocks.2"
    assert adapter.loops[0].entry == "blocks.0"
    assert any("tied copies" in note for note in adapter.notes)


def test_untied_stack_is_not_a_loop(tmp_path):
    """The same architecture with its own weights per layer is an ordinary stack."""
    model = TiedCopies(tied=False)
    with pytest.raises(LoopNotFoundError, match="no loop found in TiedCopies") as info:
        loopscope.attach(model, tmp_path / "u.h5")
    assert "none entered more than once" in str(info.value)
    assert not (tmp_path / "u.h5").exists()


def test_model_without_loop(tmp_path):
    model = nn.Sequential(nn.Embedding(10, H), nn.Linear(H, H), nn.Linear(H, 10))
    with pytest.raises(LoopNotFoundError) as info:
        loopscope.attach(model, tmp_path / "none.h5")
    message = str(info.value)
    assert message.startswith("no loop found in Sequential") and "pass loop=" in message and "\n" not in message


def test_two_loops_are_ambiguous(tmp_path):
    with pytest.raises(LoopNotFoundError) as info:
        loopscope.attach(TwoLoops(), tmp_path / "two.h5")
    message = str(info.value)
    assert message.startswith("ambiguous loop in TwoLoops") and "\n" not in message
    assert "[first] x3" in message and "[second] x3" in message and "pass loop=" in message


def test_nested_loops_ask_for_both_paths(tmp_path):
    with pytest.raises(LoopNotFoundError) as info:
        loopscope.attach(Nested(), tmp_path / "nest.h5")
    message = str(info.value)
    assert message.startswith("nested loops in Nested") and "\n" not in message
    assert "[inner, inner, inner, outer]" in message and "[inner] 3 times" in message


def test_override_with_several_paths_records_each(tmp_path):
    """loop=[outer, inner] on the nested model: one loop per path, each with its own step count."""
    torch.manual_seed(0)
    model = Nested()
    ids = torch.randint(0, 16, (1, 4))
    seen, handles = _hand_capture(model.inner, [model.inner])
    with loopscope.attach(model, tmp_path / "o.h5", loop=iter(["outer", "inner"])) as cap:  # any iterable
        with torch.no_grad():
            model(ids)
    for handle in handles:
        handle.remove()
    assert [s.name for s in cap.adapter.loops] == ["outer", "inner"] and cap.adapter.family == "custom"
    with loopscope.open(tmp_path / "o.h5") as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.steps_of("outer"), [2] * 4)
        np.testing.assert_array_equal(run.steps_of("inner"), [6] * 4)
        want = torch.stack(seen["s0"] + seen["states"], dim=2)[0].numpy()
        np.testing.assert_array_equal(run.states(loop="inner"), want)


def test_override_errors_name_what_to_do(tmp_path):
    model = TiedCopies()
    with pytest.raises(LoopNotFoundError, match=r"'blocks' is a ModuleList.*e\.g\. 'blocks\.2'"):
        loopscope.attach(model, tmp_path / "e.h5", loop="blocks")
    with pytest.raises(LoopNotFoundError, match="'blocks.7': no such module in TiedCopies; modules like it"):
        loopscope.attach(model, tmp_path / "e.h5", loop="blocks.0|blocks.7")
    with pytest.raises(LoopNotFoundError, match="not a module path"):
        loopscope.attach(model, tmp_path / "e.h5", loop=[])
    with pytest.raises(LoopNotFoundError, match="not a module path"):  # was: TypeError, 'int' is not iterable
        loopscope.attach(model, tmp_path / "e.h5", loop=3)
    model.shared = model.blocks[0]  # one module under a second name
    for twice in (["blocks.0", "blocks.0"], ["blocks.0", "shared"]):  # a path twice; two paths of one shared module
        with pytest.raises(LoopNotFoundError, match="names one module twice"):  # was: a TypeError in the forward
            loopscope.attach(model, tmp_path / "e.h5", loop=twice)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not (tmp_path / "e.h5").exists()


class DrawsFromPython(Looped):
    """A model that draws from Python's and numpy's generators as it runs (a random depth, a noise schedule)."""

    def forward(self, ids):
        random.random(), np.random.rand()
        return super().forward(ids)


def test_probe_leaves_rng_and_model_untouched():
    """The probe forward must not shift the caller's random streams (torch's, Python's, numpy's) nor leave hooks."""
    model = DrawsFromPython()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    expected = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    loopscope.hooks.detect.probe(model)
    got = torch.rand(3), random.random(), np.random.rand()
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    assert model.steps == 3
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class LoopedWithBatchNorm(nn.Module):
    """A looped block with batch norm, left in training mode, as a model being trained would be."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(10, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(4))

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.block(x)
        return x


def test_probe_leaves_training_statistics_and_modes_alone():
    model = LoopedWithBatchNorm().train()
    model.block[0].eval()  # a mixed-mode model: each module's own mode must come back
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = loopscope.hooks.detect.probe(model)
    assert adapter.loops[0].exit == "block"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running stats untouched
    assert model.training and model.block.training and model.block[1].training and not model.block[0].training
