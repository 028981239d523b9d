"""ALBERT (transformers-native, tiny random configs): shared layer groups recorded as loops, exactly.

ALBERT is the oldest shared-weight family people study for fixed points: one layer group applied
``num_hidden_layers`` times. It is an encoder, so every forward is one run per batch row and there is no generate().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope

transformers = pytest.importorskip("transformers")
from transformers import AlbertConfig, AlbertForMaskedLM, AlbertModel  # noqa: E402


def _config(layers=6, groups=1, inner=1):
    return AlbertConfig(
        vocab_size=64,
        embedding_size=8,
        hidden_size=16,
        num_hidden_layers=layers,
        num_hidden_groups=groups,
        inner_group_num=inner,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )


def _reference(model, groups):
    """Hand-written capture: every group's inputs and outputs, in call order, plus the mapping's output."""
    seen = {"mapping": [], **{f"in{g}": [] for g in range(len(groups))}, **{f"out{g}": [] for g in range(len(groups))}}
    handles = [
        model.get_submodule(_path(model, "embedding_hidden_mapping_in")).register_forward_hook(
            lambda m, a, o: seen["mapping"].append(o.detach().clone())
        )
    ]
    for g, group in enumerate(groups):
        handles.append(group.register_forward_pre_hook(lambda m, a, g=g: seen[f"in{g}"].append(a[0].detach().clone())))
        handles.append(group.register_forward_hook(lambda m, a, o, g=g: seen[f"out{g}"].append(_first(o))))
    return seen, handles


def _first(output):
    """A layer group returns its state (transformers 5) or a tuple starting with it (transformers 4)."""
    return (output[0] if isinstance(output, tuple) else output).detach().clone()


def _path(model, name):
    return ("albert.encoder." if hasattr(model, "albert") else "encoder.") + name


def test_one_group_is_one_loop_of_num_hidden_layers_steps(tmp_path):
    """The usual ALBERT: the one group runs num_hidden_layers times; states, s0, mask and logits are exact."""
    torch.manual_seed(0)
    model = AlbertForMaskedLM(_config(layers=6, groups=1, inner=2)).eval()
    ids = torch.randint(5, 64, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    groups = model.albert.encoder.albert_layer_groups
    seen, handles = _reference(model, groups)
    with loopscope.attach(model, tmp_path / "albert.h5") as cap:
        with torch.no_grad():
            hooked = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    assert cap.adapter.family == "albert"
    assert [s.exit for s in cap.adapter.loops] == ["albert.encoder.albert_layer_groups.0"]
    assert torch.equal(plain, hooked.logits)
    assert len(seen["out0"]) == 6
    # s0 is what the shared group reads first: the embedding-to-hidden mapping's output.
    assert torch.equal(seen["in0"][0], seen["mapping"][0])
    want = torch.stack([seen["mapping"][0]] + seen["out0"], dim=2)  # [B, T, 7, H]
    with loopscope.open(tmp_path / "albert.h5") as capture:
        assert capture.readout.kind == "identity"
        assert capture.loop_names == ["core"]
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            assert run.attrs["call"] == "forward" and run.attrs["batch_row"] == row
            np.testing.assert_array_equal(run.token_ids, ids[row].numpy())
            np.testing.assert_array_equal(run.attention_mask, mask[row].numpy())
            np.testing.assert_array_equal(run.num_steps, [6] * 5)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
            # the last iteration is what the encoder returns to the MLM head
            np.testing.assert_array_equal(run.states(step=6), hooked.hidden_states[-1][row].numpy())


@pytest.mark.parametrize("layers", [2, 5])
def test_step_count_follows_num_hidden_layers(tmp_path, layers):
    """Changing the iteration count in the config changes the recorded steps: the loop really is the group."""
    torch.manual_seed(0)
    model = AlbertModel(_config(layers=layers)).eval()
    with loopscope.attach(model, tmp_path / "a.h5") as cap:
        with torch.no_grad():
            model(input_ids=torch.randint(5, 64, (1, 3)))
    assert cap.adapter.loops[0].exit == "encoder.albert_layer_groups.0"
    with loopscope.open(tmp_path / "a.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].num_steps, [layers] * 3)


def test_several_groups_are_one_loop_each(tmp_path):
    """num_hidden_groups=2 over 5 layers: group 0 runs layers 0-2, group 1 layers 3-4 (AlbertTransformer's split).

    Each group is its own shared block, so each is its own loop; group 1 starts from group 0's last state.
    """
    torch.manual_seed(0)
    model = AlbertModel(_config(layers=5, groups=2)).eval()
    ids = torch.randint(5, 64, (1, 4))
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    groups = model.encoder.albert_layer_groups
    seen, handles = _reference(model, groups)
    with loopscope.attach(model, tmp_path / "groups.h5") as cap:
        with torch.no_grad():
            hooked = model(input_ids=ids).last_hidden_state
    for handle in handles:
        handle.remove()
    assert torch.equal(plain, hooked)
    assert [(s.name, s.exit) for s in cap.adapter.loops] == [
        ("group_0", "encoder.albert_layer_groups.0"),
        ("group_1", "encoder.albert_layer_groups.1"),
    ]
    assert (len(seen["out0"]), len(seen["out1"])) == (3, 2)
    with loopscope.open(tmp_path / "groups.h5") as capture:
        (run,) = capture.runs
        assert run.loops == ["group_0", "group_1"]
        np.testing.assert_array_equal(run.steps_of("group_0"), [3] * 4)
        np.testing.assert_array_equal(run.steps_of("group_1"), [2] * 4)
        want0 = torch.stack([seen["mapping"][0]] + seen["out0"], dim=2)[0].numpy()
        want1 = torch.stack([seen["in1"][0]] + seen["out1"], dim=2)[0].numpy()
        np.testing.assert_array_equal(run.states(loop="group_0"), want0)
        np.testing.assert_array_equal(run.states(loop="group_1"), want1)
        np.testing.assert_array_equal(run.states(step=0, loop="group_1"), run.states(step=3, loop="group_0"))
        np.testing.assert_array_equal(run.states(step=2, loop="group_1"), hooked[0].numpy())
