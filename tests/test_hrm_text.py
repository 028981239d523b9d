"""HRM-Text (transformers-native, tiny random configs, no downloads): a slow H stream and a fast L stream.

Two nested recurrences in one forward are the case where counting module calls alone goes wrong, so both streams
are checked state by state, with their (h, l) labels, in a forward and through generate().
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "HrmTextConfig"):
    pytest.skip("hrm_text needs transformers 5.x", allow_module_level=True)

from transformers import HrmTextConfig, HrmTextForCausalLM  # noqa: E402


def _hrm(h_cycles=2, l_cycles=3):
    config = HrmTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
        H_cycles=h_cycles,
        L_cycles=l_cycles,
        num_layers_per_stack=1,
    )
    torch.manual_seed(0)
    return HrmTextForCausalLM(config).eval()


def _streams(model):
    """s0 of H (the scaled embeddings, first seen by the rotary embedding) and every H and L output."""
    return {
        "H0": (model.model.rotary_emb, "pre"),
        "H": (model.model.H_module, "post"),
        "L": (model.model.L_module, "post"),
    }


def test_two_streams_with_labels(tmp_path, forward_recorder):
    model = _hrm(h_cycles=2, l_cycles=3)
    ids = torch.randint(3, 100, (1, 5))
    with torch.no_grad():
        plain = model(ids).logits
    with loopscope.attach(model, tmp_path / "hrm.h5") as cap:
        recorder = forward_recorder(model, _streams(model))
        with torch.no_grad():
            hooked = model(ids).logits
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert cap.adapter.family == "hrm_text"
    assert torch.equal(plain, hooked)
    seen = recorder.forwards[0]
    with loopscope.open(tmp_path / "hrm.h5") as capture:
        first, gen = capture.runs
        assert first.loops == ["H", "L"]
        np.testing.assert_array_equal(first.num_steps, [2] * 5)
        np.testing.assert_array_equal(first.steps_of("L"), [6] * 5)
        labels = first.group["loops/L/step_labels"][()]
        np.testing.assert_array_equal(labels, [[-1, -1], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
        np.testing.assert_array_equal(first.step_labels("L"), labels)
        want_h = torch.stack([seen["H0"][0]] + seen["H"], dim=2)[0].numpy()
        np.testing.assert_array_equal(first.states(), want_h)
        # z_L starts from the learned z_L_init (zeros in a fresh model), broadcast over tokens
        assert not model.model.z_L_init.any()
        want_l = torch.stack([torch.zeros_like(seen["L"][0])] + seen["L"], dim=2)[0].numpy()
        np.testing.assert_array_equal(first.states(loop="L"), want_l)
        # generate: prefill + 2 fed-back tokens, each with its own trajectories
        assert gen.attrs["call"] == "generate" and gen.num_tokens == 7
        np.testing.assert_array_equal(gen.token_ids, out[0, :7].numpy())
        np.testing.assert_array_equal(gen.forward_index, [0] * 5 + [1, 2])
        np.testing.assert_array_equal(gen.states(token=6, loop="L")[-1], recorder.forwards[-1]["L"][-1][0, 0].numpy())
        assert capture.readout.kind == "identity"
    from typer.testing import CliRunner

    from loopscope.cli.app import app

    info = CliRunner().invoke(app, ["info", str(tmp_path / "hrm.h5")], terminal_width=200)
    assert info.exit_code == 0 and "H 2-2, L 6-6" in info.output  # each loop's own step range


def test_labels_follow_cycles_changed_after_attach(tmp_path):
    """HRM-Text reads L_cycles (and H_cycles) at every forward, so a researcher may give it more cycles after
    attach(): each run's (h, l) labels come from that run's own step counts (they were fixed at attach, and ran past
    the H cycles that exist)."""
    model = _hrm(h_cycles=2, l_cycles=3)
    ids = torch.randint(3, 100, (1, 4))
    with loopscope.attach(model, tmp_path / "hrm.h5"), torch.no_grad():
        for h_cycles, l_cycles in ((2, 3), (2, 2), (3, 4)):
            model.config.H_cycles, model.config.L_cycles = h_cycles, l_cycles
            model(ids)
    with loopscope.open(tmp_path / "hrm.h5") as capture:
        for run, (h_cycles, l_cycles) in zip(capture.runs, ((2, 3), (2, 2), (3, 4))):
            want = [[-1, -1]] + [list(divmod(k, l_cycles)) for k in range(h_cycles * l_cycles)]
            assert run.steps_of("L").tolist() == [h_cycles * l_cycles] * 4
            assert run.step_labels("L").tolist() == want


def test_generate_every_token_exact_and_outputs_unchanged(tmp_path, forward_recorder):
    """Each decoded token has H_cycles and H_cycles * L_cycles steps, the states the model computed for it, and
    generate() returns the same tokens and logits with and without the capture."""
    model = _hrm(h_cycles=2, l_cycles=2)
    ids = torch.randint(3, 100, (2, 4))
    kwargs = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    plain = model.generate(ids, **kwargs)
    with loopscope.attach(model, tmp_path / "g.h5"):
        recorder = forward_recorder(model, _streams(model))
        hooked = model.generate(ids, **kwargs)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    forwards = recorder.forwards
    assert len(forwards) == 4  # prefill + 3 fed-back tokens
    with loopscope.open(tmp_path / "g.h5") as capture:
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            assert run.num_tokens == 7
            np.testing.assert_array_equal(run.token_ids, hooked.sequences[row, :7].numpy())
            np.testing.assert_array_equal(run.positions, np.arange(7))
            np.testing.assert_array_equal(run.num_steps, [2] * 7)
            np.testing.assert_array_equal(run.steps_of("L"), [4] * 7)
            want_h = torch.cat([torch.stack([f["H0"][0]] + f["H"], dim=2)[row] for f in forwards])
            want_l = torch.cat([torch.stack([torch.zeros_like(f["L"][0])] + f["L"], dim=2)[row] for f in forwards])
            np.testing.assert_array_equal(run.states(), want_h.numpy())
            np.testing.assert_array_equal(run.states(loop="L"), want_l.numpy())
