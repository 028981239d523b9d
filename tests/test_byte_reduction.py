"""Byte reduction on the device: ``tokens=`` keeps chosen tokens, ``step_stride=`` every n-th iteration plus each
token's last; what was kept is in the file, and the stored values are exactly the model's."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import loopscope
from loopscope.analysis import token_metrics
from loopscope.analysis.figure_axes import prompt_rows
from loopscope.errors import LoopscopeError


def _trajectories(recorder, steps):
    """Per forward [T, steps + 1, H] from a ReferenceRecorder (s0, then one state per iteration)."""
    return [
        torch.stack([recorder.s0[f * steps]] + recorder.states[f * steps : (f + 1) * steps], dim=2)[0]
        for f in range(len(recorder.states) // steps)
    ]


def _generate(model, ids, capture_path=None, **options):
    torch.manual_seed(0)
    kwargs = dict(
        num_steps=options.pop("num_steps", 5), max_new_tokens=options.pop("max_new_tokens", 4), do_sample=False
    )
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


@pytest.mark.parametrize(
    "steps, stride, kept", [(8, 3, [0, 3, 6, 8]), (9, 3, [0, 3, 6, 9]), (5, 1, [0, 1, 2, 3, 4, 5])]
)
def test_step_stride_keeps_every_nth_and_the_last(
    reference_model, prompt_ids, reference_recorder, tmp_path, steps, stride, kept
):
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
        # analysis labels stored steps with the iterations they hold: in arrays, convergence steps and the CSV
        np.testing.assert_array_equal(metrics.step_iterations()[0], kept)
        slots = metrics.convergence_steps(0.5)
        np.testing.assert_array_equal(metrics.convergence_iterations(0.5), np.array(kept)[slots])
        metrics.to_csv(tmp_path / "m.csv", tol=0.5)
        rows = list(csv.DictReader(open(tmp_path / "m.csv")))
        assert [int(r["iteration"]) for r in rows[: len(kept)]] == kept
        assert int(rows[0]["converged_at"]) == kept[slots[0]]


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


def test_stride_refused_for_nested_loops(tmp_path, new_hrm_text_model):
    model = new_hrm_text_model()
    with pytest.raises(LoopscopeError, match="nested loops"):
        loopscope.attach(model, tmp_path / "hrm.h5", step_stride=2)


def test_token_indices_are_the_same_tokens_in_every_row(reference_model, tmp_path):
    ids = torch.tensor([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with loopscope.attach(reference_model, tmp_path / "rows.h5", tokens=[1, 3, 6]):
        torch.manual_seed(0)
        out = reference_model.generate(ids, attention_mask=mask, num_steps=3, max_new_tokens=3, do_sample=False)
    with loopscope.open(tmp_path / "rows.h5") as capture:
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.token_ids, out[row, [1, 3, 6]].numpy())
            np.testing.assert_array_equal(run.attention_mask[:2], mask[row, [1, 3]].numpy())


def test_a_call_that_stores_no_token_leaves_no_run(reference_model, prompt_ids, tmp_path):
    with loopscope.attach(reference_model, tmp_path / "none.h5", tokens="generated") as capture:
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=3)  # a forward() generates nothing
        _generate(reference_model, prompt_ids, num_steps=3, max_new_tokens=3)
    with loopscope.open(capture.path) as f:
        (run,) = f.runs  # the generate() call, numbered 0: the forward left neither a run nor a gap
        assert run.index == 0 and run.attrs["call"] == "generate" and run.num_tokens == 2


def test_prompt_and_generated_in_a_token_by_token_forward(reference_model, prompt_ids, tmp_path):
    """forward_with_adaptive_compute runs the prompt one token per group: every token is still prompt."""
    from loopscope.models.huginn_reference import get_adaptive_exit_evaluator

    for which, expected in (("prompt", prompt_ids.shape[1]), ("generated", 0)):
        path = tmp_path / f"{which}.h5"
        with loopscope.attach(reference_model, path, tokens=which):
            reference_model.forward_with_adaptive_compute(
                prompt_ids, get_adaptive_exit_evaluator(reference_model, "kl", 1e-3)
            )
        with loopscope.open(path) as capture:
            assert sum(r.num_tokens for r in capture.runs) == expected
            if capture.runs:  # and figures draw no prompt/generated line in it (a group per token is no decoding)
                assert prompt_rows(capture.runs[0]) is None


def test_step_stride_under_inference_mode(reference_model, prompt_ids, reference_recorder, tmp_path):
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "inf.h5", step_stride=2), torch.inference_mode():
        torch.manual_seed(0)
        reference_model(prompt_ids, num_steps=5)
    recorder.remove()
    (full,) = _trajectories(recorder, 5)
    with loopscope.open(tmp_path / "inf.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].states(), full[:, [0, 2, 4, 5]].numpy())


class _HalfBlock(torch.nn.Module):
    """Computes in float16 whatever it is given (as under autocast); from call ``widen_from`` on it returns
    float32."""

    def __init__(self, widen_from: int | None = None):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16).half()
        self.widen_from, self.calls = widen_from, 0

    def forward(self, x):
        self.calls += 1
        y = torch.tanh(self.lin(x.half()))
        return y.float() if self.widen_from is not None and self.calls >= self.widen_from else y


class _HalfLoop(torch.nn.Module):
    def __init__(self, embed_dtype=torch.float32, widen_from=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(50, 16).to(embed_dtype)
        self.block = _HalfBlock(widen_from)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for _ in range(12):
            x = self.block(x)
        return x


def test_a_loop_whose_dtype_changes_is_stored_in_one_dtype_exactly(tmp_path):
    model = _HalfLoop()
    ids = torch.arange(6).unsqueeze(0)
    seen = []
    handle = model.block.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    with loopscope.attach(model, tmp_path / "half.h5", loop="block", chunks=(1, 1)):
        model(ids)
    handle.remove()
    assert seen[0].dtype == torch.float16
    with loopscope.open(tmp_path / "half.h5") as capture:
        run = capture.runs[0]
        assert run.logical_dtype() == "float32"  # s0 (float32 embeddings) came first; float16 widens exactly
        np.testing.assert_array_equal(run.states()[:, 0], model.embed(ids)[0].detach().numpy())
        np.testing.assert_array_equal(run.states()[:, 1:], torch.stack(seen, dim=2)[0].float().numpy())


def test_a_wider_dtype_after_a_narrower_one_is_a_one_line_error(tmp_path):
    model = _HalfLoop(embed_dtype=torch.float16, widen_from=4)
    with pytest.raises(LoopscopeError, match="float32 states after float16 ones; pass dtype='float32'"):
        with loopscope.attach(model, tmp_path / "wide.h5", loop="block"), pytest.warns(RuntimeWarning, match="closed"):
            model(torch.arange(6).unsqueeze(0))


def test_bad_slices_are_one_line_errors(reference_model, tmp_path):
    for value, needle in [
        (slice("a", 3), "takes integers"),
        (slice(0, None, 0), "positive step"),
        ([True], r"tokens=\[True\]"),
    ]:
        with pytest.raises(LoopscopeError, match=needle):
            loopscope.attach(reference_model, tmp_path / "bad.h5", tokens=value)


def test_each_run_keeps_its_own_dtype(tmp_path):
    """A model cast between calls: each run is stored in the dtype its own loop produced."""
    model = _HalfLoop(embed_dtype=torch.float16, widen_from=None)
    ids = torch.arange(6).unsqueeze(0)
    with loopscope.attach(model, tmp_path / "two.h5", loop="block"):
        model(ids)
        model.embed.float()
        model.block.widen_from = 0  # now every state is float32, s0 too
        model(ids)
    with loopscope.open(tmp_path / "two.h5") as capture:
        assert [r.logical_dtype() for r in capture.runs] == ["float16", "float32"]


def test_generate_without_a_cache_records_each_token_once(reference_model, prompt_ids, reference_recorder, tmp_path):
    """generate(use_cache=False) runs the whole sequence again at each step: the run holds each token once, from
    the forward that first computed it (as with a cache), and tokens="generated" keeps the generated ones."""

    def generate():
        torch.manual_seed(0)
        return reference_model.generate(prompt_ids, num_steps=3, max_new_tokens=4, do_sample=False, use_cache=False)

    plain = generate()
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "all.h5"):
        out = generate()
    recorder.remove()
    with loopscope.attach(reference_model, tmp_path / "generated.h5", tokens="generated"):
        generate()
    assert torch.equal(out, plain)
    prompt = prompt_ids.shape[1]
    forwards = _trajectories(recorder, 3)  # [T_f, 4, H] per forward: the prompt, then the prompt and 1, 2, 3 more
    expected = torch.cat([forwards[0]] + [f[-1:] for f in forwards[1:]]).numpy()
    with loopscope.open(tmp_path / "all.h5") as all_tokens, loopscope.open(tmp_path / "generated.h5") as generated:
        (run,), (new,) = all_tokens.runs, generated.runs
        assert [f.shape[0] for f in forwards] == [prompt, prompt + 1, prompt + 2, prompt + 3]
        np.testing.assert_array_equal(run.token_ids, out[0, : prompt + 3].numpy())
        np.testing.assert_array_equal(run.positions, np.arange(prompt + 3))
        np.testing.assert_array_equal(run.forward_index, [0] * prompt + [1, 2, 3])
        np.testing.assert_array_equal(run.states(), expected)
        np.testing.assert_array_equal(new.positions, np.arange(prompt, prompt + 3))
        np.testing.assert_array_equal(new.states(), expected[prompt:])
