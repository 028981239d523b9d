"""The spine on transformers-native looped models (tiny random configs, no downloads): HRM-Text, Inkling-2 loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "HrmTextConfig"):
    pytest.skip("hrm_text / inkling2_loop need transformers 5.x", allow_module_level=True)

from transformers import HrmTextConfig, HrmTextForCausalLM  # noqa: E402
from transformers.models.inkling2_loop.configuration_inkling2_loop import Inkling2LoopTextConfig  # noqa: E402
from transformers.models.inkling2_loop.modeling_inkling2_loop import Inkling2LoopForCausalLM  # noqa: E402


def _hrm(h_cycles=2, l_cycles=3):
    config = HrmTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, H_cycles=h_cycles, L_cycles=l_cycles, num_layers_per_stack=1,
    )
    torch.manual_seed(0)
    return HrmTextForCausalLM(config).eval()


def _inkling(passes=3):
    config = Inkling2LoopTextConfig(
        vocab_size=128, unpadded_vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=16, d_rel=4, rel_extent=16, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4,
        loop_num_passes=passes, loop_gate_rank=8, eos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    return Inkling2LoopForCausalLM(config).eval()


def _record(hooks):
    """Hand-written capture: {name: list of cloned tensors}, plus the handles to remove."""
    seen, handles = {}, []
    for name, module, kind, pick in hooks:
        seen[name] = []

        def fn(*hook_args, name=name, pick=pick):
            seen[name].append(pick(*hook_args).detach().clone())

        handles.append(module.register_forward_pre_hook(fn) if kind == "pre" else module.register_forward_hook(fn))
    return seen, handles


def test_hrm_two_streams_with_labels(tmp_path):
    model = _hrm(h_cycles=2, l_cycles=3)
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        plain = model(ids).logits
    seen, handles = _record([
        ("H0", model.model.rotary_emb, "pre", lambda m, a: a[0]),
        ("H", model.model.H_module, "post", lambda m, a, o: o),
        ("L", model.model.L_module, "post", lambda m, a, o: o),
    ])
    with loopscope.attach(model, tmp_path / "hrm.h5") as cap:
        with torch.no_grad():
            hooked = model(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    for handle in handles:
        handle.remove()
    assert cap.adapter.family == "hrm_text"
    assert torch.equal(plain, hooked)
    with loopscope.open(tmp_path / "hrm.h5") as capture:
        first, gen = capture.runs
        assert first.loops == ["H", "L"]
        np.testing.assert_array_equal(first.num_steps, [2] * 5)
        np.testing.assert_array_equal(first.steps_of("L"), [6] * 5)
        labels = first.group["loops/L/step_labels"][()]
        np.testing.assert_array_equal(labels, [[-1, -1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
        want_h = torch.stack([seen["H0"][0]] + seen["H"][:2], dim=2)[0].numpy()
        np.testing.assert_array_equal(first.states(), want_h)
        want_l = torch.stack([torch.zeros_like(seen["L"][0])] + seen["L"][:6], dim=2)[0].numpy()
        np.testing.assert_array_equal(first.states(loop="L"), want_l)
        # generate: prefill + 2 fed-back tokens, each with its own trajectories
        assert gen.attrs["call"] == "generate" and gen.num_tokens == 7
        np.testing.assert_array_equal(gen.token_ids, out[0, :7].numpy())
        np.testing.assert_array_equal(gen.forward_index, [0] * 5 + [1, 2])
        np.testing.assert_array_equal(gen.states(token=6, loop="L")[-1], seen["L"][-1][0, 0].numpy())
        assert capture.readout.kind == "identity"


def test_inkling2_loop_passes(tmp_path):
    model = _inkling(passes=3)
    ids = torch.randint(3, 128, (2, 4))
    with torch.no_grad():
        plain = model(ids).logits
    seen, handles = _record([
        ("s0", model.model.layers[2], "pre", lambda m, a: a[0]),
        ("exit", model.model.layers[3], "post", lambda m, a, o: o),
    ])
    with loopscope.attach(model, tmp_path / "ink.h5") as cap:
        with torch.no_grad():
            hooked = model(ids).logits
    for handle in handles:
        handle.remove()
    assert cap.adapter.family == "inkling2_loop" and cap.adapter.loops[0].exit == "model.layers.3"
    assert torch.equal(plain, hooked)
    want = torch.stack([seen["s0"][0]] + seen["exit"], dim=2)  # [B, T, 4, H]
    with loopscope.open(tmp_path / "ink.h5") as capture:
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.num_steps, [3] * 4)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
        # no readout norm applies to the loop state: analysis defaults to the raw state
        d = loopscope.analysis.convergence(capture.runs[0])
        assert d.shape == (4, 4) and np.all(d[:, -1] == 0)


def test_inkling2_loop_generate_and_pass_count(tmp_path):
    model = _inkling(passes=2)
    ids = torch.randint(3, 128, (1, 4))
    with loopscope.attach(model, tmp_path / "g.h5"):
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    with loopscope.open(tmp_path / "g.h5") as capture:
        (run,) = capture.runs
        assert run.num_tokens == 6
        np.testing.assert_array_equal(run.token_ids, out[0, :6].numpy())
        np.testing.assert_array_equal(run.num_steps, [2] * 6)
        assert not np.isnan(run.states()).any()
