"""Byte reduction on the device: ``tokens=`` keeps chosen tokens, ``step_stride=`` every n-th iteration plus each
token's last; what was kept is in the file, and the stored values are exactly the model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope
from loopscope.analysis import token_metrics
from loopscope.storage.errors import LoopscopeError


def _trajectories(recorder, steps):
    """Per forward [T, steps + 1, H] from a ReferenceRecorder (s0, then one state per iteration)."""
    return [
        torch.stack([recorder.s0[f * steps]] + recorder.states[f * steps : (f + 1) * steps], dim=2)[0]
        for f in range(len(recorder.states) // steps)
    ]


def _generate(model, ids, capture_path=None, **options):
    torch.manual_seed(0)
    kwargs = dict(num_steps=options.pop("num_steps", 5), max_new_tokens=options.pop("max_new_tokens", 4), do_sample=False)
    if capture_path is None:
        return model.generate(ids, **kwargs)
    with loopscope.attach(model, capture_path, **options):
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize("which", ["prompt", "generated"])
def test_prompt_or_generated_tokens_only(reference_model, prompt_ids, reference_recorder, tmp_path, which):
    plain = _generate(reference_model, prompt_ids)
    recorder = reference_recorder(reference_model)
    out = _generate(reference_model, prompt_ids, tmp_path / "t.h5", tokens=which)
    recorder.remove()
    assert torch.equal(plain, out)
    forwards = _trajectories(recorder, 5)
    prompt_len = prompt_ids.shape[1]
    with loopscope.open(tmp_path / "t.h5") as capture:
        (run,) = capture.runs
        if which == "prompt":
            np.testing.assert_array_equal(run.positions, np.arange(prompt_len))
            np.testing.assert_array_equal(run.states(), forwards[0].numpy())
        else:
            np.testing.assert_array_equal(run.positions, np.arange(prompt_len, prompt_len + 3))
            np.testing.assert_array_equal(run.token_ids, out[0, prompt_len : prompt_len + 3].numpy())
            np.testing.assert_array_equal(run.forward_index, [1, 2, 3])
            np.testing.assert_array_equal(run.states(), torch.cat(forwards[1:]).numpy())
        assert capture.meta["options_json"]["tokens"] == which


def test_positions_by_slice_and_list(reference_model, prompt_ids, reference_recorder, tmp_path):
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "s.h5", tokens=slice(1, None, 3)):
        torch.manual_seed(1)
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=4)
    with loopscope.attach(reference_model, tmp_path / "l.h5", tokens=[0, 2, prompt_ids.shape[1] + 1]):
        out = _generate(reference_model, prompt_ids, num_steps=4)
    recorder.remove()
    full = _trajectories(recorder, 4)
    keep = np.arange(1, prompt_ids.shape[1], 3)
    with loopscope.open(tmp_path / "s.h5") as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.positions, keep)
        np.testing.assert_array_equal(run.token_ids, prompt_ids[0, keep].numpy())
        np.testing.assert_array_equal(run.states(), full[0][keep].numpy())
    with loopscope.open(tmp_path / "l.h5") as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.positions, [0, 2, prompt_ids.shape[1] + 1])
        np.testing.assert_array_equal(run.token_ids, out[0, [0, 2, prompt_ids.shape[1] + 1]].numpy())
        np.testing.assert_array_equal(run.states()[:2], full[1][[0, 2]].numpy())
        np.testing.assert_array_equal(run.states()[2], full[3][0].numpy())  # the second decoded token's forward


@pytest.mark.parametrize("steps, stride, kept", [(8, 3, [0, 3, 6, 8]), (9, 3, [0, 3, 6, 9]), (5, 1, [0, 1, 2, 3, 4, 5])])
def test_step_stride_keeps_every_nth_and_the_last(reference_model, prompt_ids, reference_recorder, tmp_path, steps, stride, kept):
    torch.manual_seed(2)
    with torch.no_grad():
        plain = reference_model(prompt_ids, num_steps=steps).logits
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "k.h5", step_stride=stride):
        torch.manual_seed(2)
        with torch.no_grad():
            hooked = reference_model(prompt_ids, num_steps=steps).logits
    recorder.remove()
    assert torch.equal(plain, hooked)
    (full,) = _trajectories(recorder, steps)
    with loopscope.open(tmp_path / "k.h5") as capture:
        (run,) = capture.runs
        assert run.step_stride == stride
        assert run.dataset().shape[1] == len(kept)
        np.testing.assert_array_equal(run.steps_of(None), np.full(run.num_tokens, len(kept) - 1))
        np.testing.assert_array_equal(run.iterations_of(), np.full(run.num_tokens, steps))
        np.testing.assert_array_equal(run.step_iterations()[0], kept)
        np.testing.assert_array_equal(run.states(), full[:, kept].numpy())
        # the final state is kept, so distances to s* = "final" end at exactly zero
        metrics = token_metrics(run)
        assert np.all(metrics.distance[:, len(kept) - 1] == 0)


def test_step_stride_with_adaptive_exit_keeps_each_tokens_exit_state(reference_model, prompt_ids, tmp_path):
    options = dict(max_new_tokens=6, num_steps=24, criterion="kl", exit_threshold=1e-4, do_sample=False)
    torch.manual_seed(0)
    with loopscope.attach(reference_model, tmp_path / "full.h5"):
        plain = reference_model.generate(prompt_ids, **options)
    torch.manual_seed(0)
    with loopscope.attach(reference_model, tmp_path / "stride.h5", step_stride=4):
        hooked = reference_model.generate(prompt_ids, **options)
    assert torch.equal(plain, hooked)
    with loopscope.open(tmp_path / "full.h5") as full, loopscope.open(tmp_path / "stride.h5") as strided:
        a, b = full.runs[0], strided.runs[0]
        np.testing.assert_array_equal(a.num_steps, b.iterations_of())
        labels = b.step_iterations()
        for t in range(a.num_tokens):
            kept = labels[t][labels[t] >= 0]
            assert kept[-1] == a.num_steps[t]
            np.testing.assert_array_equal(b.states(token=t), a.states(token=t)[kept])
            signal_a, signal_b = a.signal("exit_value")[t], b.signal("exit_value")[t]
            np.testing.assert_array_equal(signal_b[: len(kept)], signal_a[kept])


def test_bad_options_are_one_line_errors(reference_model, tmp_path):
    for options, needle in [
        (dict(tokens="middle"), "tokens='middle'"),
        (dict(tokens=slice(-3, None)), "non-negative"),
        (dict(tokens=[1.5]), "tokens=[1.5]"),
        (dict(step_stride=0), "step_stride=0"),
        (dict(step_stride=2.5), "step_stride=2.5"),
    ]:
        with pytest.raises(LoopscopeError, match=needle.replace("[", r"\[").replace("]", r"\]")) as info:
            loopscope.attach(reference_model, tmp_path / "bad.h5", **options)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "bad.h5").exists()


def test_stride_refused_for_nested_loops(tmp_path):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "HrmTextConfig"):
        pytest.skip("hrm_text needs transformers 5.x")
    config = transformers.HrmTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
        head_dim=8, H_cycles=2, L_cycles=3, num_layers_per_stack=1,
    )
    model = transformers.HrmTextForCausalLM(config).eval()
    with pytest.raises(LoopscopeError, match="nested loops"):
        loopscope.attach(model, tmp_path / "hrm.h5", step_stride=2)

