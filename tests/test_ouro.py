"""Ouro-style looped LM (examples/ouro_reference.py, tiny random config): passes of a shared decoder stack, each
ending in ``model.norm``, with a per-pass exit-gate logit recorded beside the states.

Ouro's exit decision lives in the gate values, not in how many passes run, so the test checks both: every token has
``total_ut_steps`` states equal to the norm's outputs, and the ``exit_gate`` signal holds exactly what the gate
returned at each pass, enough to recompute the pass each token's logits came from.
"""

from __future__ import annotations

import numpy as np
import torch

import loopscope
from loopscope.models.ouro_reference import OuroReferenceForCausalLM, exit_distribution, register, tiny_config


def _ouro(**overrides):
    register()
    torch.manual_seed(0)
    return OuroReferenceForCausalLM(tiny_config(**overrides)).eval()


def _watch(model):
    """s0 = the first shared layer's input at the first pass; states = norm outputs; gates = exit-gate outputs."""
    return {
        "s0": (model.model.layers[0], "pre"),
        "norm": (model.model.norm, "post"),
        "gate": (model.model.early_exit_gate, "post"),
    }


def _want(forward, row, passes):
    """One forward's expected states [T, passes + 1, H] and gate values [T, passes + 1] (step 0 has no gate)."""
    assert len(forward["norm"]) == len(forward["gate"]) == passes
    states = torch.stack([forward["s0"][0]] + forward["norm"], dim=2)[row]
    gates = torch.cat([torch.full_like(forward["gate"][0], float("nan"))] + forward["gate"], dim=-1)[row]
    return states.numpy(), gates.numpy()


def test_forward_states_and_exit_gate(tmp_path, forward_recorder):
    model = _ouro(total_ut_steps=4)
    ids = torch.randint(3, 128, (2, 5))
    with torch.no_grad():
        plain = model(ids)
    with loopscope.attach(model, tmp_path / "ouro.h5") as cap:
        recorder = forward_recorder(model, _watch(model))
        with torch.no_grad():
            hooked = model(ids)
    assert torch.equal(plain.logits, hooked.logits) and torch.equal(plain.exit_logits, hooked.exit_logits)
    assert cap.adapter.family == "ouro"
    spec = cap.adapter.loops[0]
    assert (spec.exit, spec.entry, spec.signals) == (
        "model.norm",
        "model.layers.0",
        (("exit_gate", "model.early_exit_gate"),),
    )
    (forward,) = recorder.forwards
    with loopscope.open(tmp_path / "ouro.h5") as capture:
        assert capture.readout.kind == "identity"  # the norm's output is what lm_head reads
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            states, gates = _want(forward, row, 4)
            np.testing.assert_array_equal(run.token_ids, ids[row].numpy())
            np.testing.assert_array_equal(run.num_steps, [4] * 5)
            np.testing.assert_array_equal(run.states(), states)
            assert run.signal_names() == ["exit_gate"]
            gate = run.signal("exit_gate")
            assert gate.shape == (5, 5) and gate.dtype == np.float32
            np.testing.assert_array_equal(gate, gates)  # NaN at step 0 on both sides
            # the signal is the gate's logit, as the model returns it (not its sigmoid)
            np.testing.assert_array_equal(gate[:, 1:], hooked.exit_logits[row].numpy())


def test_generate_every_token_and_outputs_unchanged(tmp_path, forward_recorder):
    """Left-padded batch through generate(): each run holds prompt + fed-back tokens in order, each with its own
    passes, gate values, mask and position; tokens and logits are the same with and without the capture."""
    model = _ouro(total_ut_steps=3)
    ids = torch.randint(3, 128, (2, 5))
    ids[0, :2] = 0
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(
        attention_mask=mask, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    plain = model.generate(ids, **kwargs)
    with loopscope.attach(model, tmp_path / "g.h5"):
        recorder = forward_recorder(model, _watch(model))
        hooked = model.generate(ids, **kwargs)
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, hooked.logits, strict=True))
    forwards = recorder.forwards
    assert [f["norm"][0].shape[1] for f in forwards] == [5, 1, 1, 1]  # prefill, then one token per forward
    with loopscope.open(tmp_path / "g.h5") as capture:
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            assert run.attrs["call"] == "generate"
            np.testing.assert_array_equal(run.token_ids, hooked.sequences[row, :8].numpy())
            np.testing.assert_array_equal(run.forward_index, [0] * 5 + [1, 2, 3])
            np.testing.assert_array_equal(run.attention_mask, [*mask[row].tolist(), 1, 1, 1])
            first = 2 if row == 0 else 0  # positions skip the left padding
            np.testing.assert_array_equal(run.positions[first:], np.arange(8 - first))
            np.testing.assert_array_equal(run.num_steps, [3] * 8)
            wants = [_want(f, row, 3) for f in forwards]
            np.testing.assert_array_equal(run.states(), np.concatenate([w[0] for w in wants]))
            np.testing.assert_array_equal(run.signal("exit_gate"), np.concatenate([w[1] for w in wants]))


def test_pass_count_follows_total_ut_steps(tmp_path):
    """Changing the pass count changes the recorded steps: the norm really is called once per pass."""
    model = _ouro(total_ut_steps=4)
    ids = torch.randint(3, 128, (1, 3))
    with loopscope.attach(model, tmp_path / "n.h5"):
        with torch.no_grad():
            model(ids)
            model.model.total_ut_steps = 2
            model(ids)
    with loopscope.open(tmp_path / "n.h5") as capture:
        four, two = capture.runs
        np.testing.assert_array_equal(four.num_steps, [4] * 3)
        np.testing.assert_array_equal(two.num_steps, [2] * 3)
        assert two.signal("exit_gate").shape == (3, 3)


def test_exit_threshold_is_recomputable_from_the_signal(tmp_path):
    """With exit_threshold every pass still runs (num_steps stays total_ut_steps); the pass each token was read out
    from follows from the recorded gate logits alone, as the model computes it."""
    model = _ouro(total_ut_steps=4)
    ids = torch.randint(3, 128, (1, 6))
    with loopscope.attach(model, tmp_path / "t.h5"):
        with torch.no_grad():
            out = model(ids, exit_threshold=0.6)
    assert out.exit_pass.min() < 3  # some tokens leave before the last pass
    with loopscope.open(tmp_path / "t.h5") as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.num_steps, [4] * 6)
        cumulative = exit_distribution(torch.from_numpy(run.signal("exit_gate")[:, 1:])).cumsum(-1)
        reached = cumulative >= 0.6
        reached[:, -1] = True
        np.testing.assert_array_equal(reached.int().argmax(-1).numpy(), out.exit_pass[0].numpy())
        # the chosen pass's state is the one the head read
        chosen = torch.from_numpy(run.states()[np.arange(6), out.exit_pass[0].numpy() + 1])[None]
        with torch.no_grad():
            np.testing.assert_array_equal(model.lm_head(chosen).float().numpy(), out.logits.numpy())


def test_loaded_through_auto_classes(tmp_path):
    """save_pretrained -> AutoModelForCausalLM.from_pretrained (the registered model type) is found as Ouro."""
    from transformers import AutoModelForCausalLM

    _ouro().save_pretrained(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(model) is OuroReferenceForCausalLM
    with loopscope.attach(model, tmp_path / "a.h5") as cap:
        with torch.no_grad():
            model(torch.randint(3, 128, (1, 3)))
    assert cap.adapter.family == "ouro"
    with loopscope.open(tmp_path / "a.h5") as capture:
        assert capture.meta["config_json"]["model_type"] == "loopscope_ouro"
        assert capture.meta["loop_json"]["loops"][0]["signals"] == [["exit_gate", "model.early_exit_gate"]]


def test_reference_cache_holds_one_entry_per_pass_and_layer():
    """The reference model's own contract: decoding with the cache computes what a full recomputation does, because
    a new token's pass p attends to the keys the earlier tokens made at pass p."""
    model = _ouro(total_ut_steps=3, num_hidden_layers=2)
    ids = torch.randint(3, 128, (2, 6))
    with torch.no_grad():
        full = model(ids, use_cache=False)
        prefix = model(ids[:, :5], use_cache=True)
        cache = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
        assert len(cache.layers) == 3 * 2 and cache.get_seq_length() == 5
        step = model(ids[:, 5:], position_ids=torch.tensor([[5]]), use_cache=True, past_key_values=cache)
    torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1])
    torch.testing.assert_close(step.exit_logits[:, -1], full.exit_logits[:, -1])
