"""Inkling-2 loop (transformers-native, tiny random configs, no downloads): ``layers[start:end]`` run
``loop_num_passes`` times.

The looped range is a slice of ``model.layers``, not a module, so the exit is its last layer and s0 its first
layer's input; every pass restarts from the pre-loop states, which is why s0 is checked at every forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope

pytest.importorskip("transformers.models.inkling2_loop", reason="inkling2_loop needs transformers 5.x")

from transformers.models.inkling2_loop.configuration_inkling2_loop import Inkling2LoopTextConfig  # noqa: E402
from transformers.models.inkling2_loop.modeling_inkling2_loop import Inkling2LoopForCausalLM  # noqa: E402


def _inkling(passes=3):
    config = Inkling2LoopTextConfig(
        vocab_size=128,
        unpadded_vocab_size=128,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        swa_num_attention_heads=2,
        swa_num_key_value_heads=1,
        swa_head_dim=16,
        sliding_window_size=16,
        d_rel=4,
        rel_extent=16,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_layers_per_attn_res_block=2,
        loop_layer_index_start=2,
        loop_layer_index_end=4,
        loop_num_passes=passes,
        loop_gate_rank=8,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return Inkling2LoopForCausalLM(config).eval()


def _slice(model):
    """The looped slice layers[2:4]: s0 is layer 2's input, each pass ends with layer 3's output."""
    return {"s0": (model.model.layers[2], "pre"), "exit": (model.model.layers[3], "post")}


def test_passes(tmp_path, forward_recorder):
    model = _inkling(passes=3)
    ids = torch.randint(3, 128, (2, 4))
    with torch.no_grad():
        plain = model(ids).logits
    with loopscope.attach(model, tmp_path / "ink.h5") as cap:
        recorder = forward_recorder(model, _slice(model))
        with torch.no_grad():
            hooked = model(ids).logits
    assert cap.adapter.family == "inkling2_loop" and cap.adapter.loops[0].exit == "model.layers.3"
    assert torch.equal(plain, hooked)
    (seen,) = recorder.forwards
    assert len(seen["exit"]) == 3
    want = torch.stack([seen["s0"][0]] + seen["exit"], dim=2)  # [B, T, 4, H]
    with loopscope.open(tmp_path / "ink.h5") as capture:
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.token_ids, ids[row].numpy())
            np.testing.assert_array_equal(run.num_steps, [3] * 4)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
        # no readout norm applies to the loop state: analysis defaults to the raw state
        assert capture.readout.kind == "none"
        d = loopscope.analysis.convergence(capture.runs[0])
        assert d.shape == (4, 4) and np.all(d[:, -1] == 0)


def test_generate_and_pass_count(tmp_path):
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


def test_generate_every_token_exact_and_outputs_unchanged(tmp_path, forward_recorder):
    """Prefill and each decoded token: loop_num_passes steps, the model's own states, and the same tokens and logits
    with and without the capture."""
    model = _inkling(passes=3)
    ids = torch.randint(3, 128, (2, 5))
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = model.generate(ids, **kwargs)
    with loopscope.attach(model, tmp_path / "g.h5"):
        recorder = forward_recorder(model, _slice(model))
        hooked = model.generate(ids, **kwargs)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    forwards = recorder.forwards
    assert [f["exit"][0].shape[1] for f in forwards] == [5, 1, 1]
    with loopscope.open(tmp_path / "g.h5") as capture:
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.token_ids, hooked.sequences[row, :7].numpy())
            np.testing.assert_array_equal(run.forward_index, [0] * 5 + [1, 2])
            np.testing.assert_array_equal(run.num_steps, [3] * 7)
            want = torch.cat([torch.stack([f["s0"][0]] + f["exit"], dim=2)[row] for f in forwards])
            np.testing.assert_array_equal(run.states(), want.numpy())
