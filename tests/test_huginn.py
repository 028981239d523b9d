"""Huginn-0125's ways of running its loop, on the reference model that mirrors its code.

Fixed ``num_steps`` forms, forward, generate and batches are covered in ``test_capture.py`` (the spine); this module
covers what is particular to Huginn: adaptive per-token exit (``criterion=`` / ``exit_evaluator=``, a decoding loop
that never calls ``forward()``), ``continuous_compute`` warm starts, ``test_time_noise`` and the default depth.
Expected values come from plain hooks written here, never from loopscope itself.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import loopscope
from loopscope.analysis.figure_axes import prompt_rows
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, tiny_config


class GroupRecorder:
    """A hand-written capture for decoding loops outside forward(): every call of the token embedding starts a
    group; s0 is the adapter's first input in a group, states are the outputs of the last core block."""

    def __init__(self, model):
        hidden = model.config.n_embd
        self.groups: list[dict] = []
        self.ln_f_calls = 0

        def on_embed(module, args, output):
            self.groups.append({"tokens": output.shape[1], "s0": None, "states": []})

        def on_adapter(module, args):
            if self.groups and self.groups[-1]["s0"] is None:
                self.groups[-1]["s0"] = args[0][..., :hidden].detach().clone()

        def on_exit(module, args, output):
            self.groups[-1]["states"].append(output.detach().clone())

        def on_ln_f(module, args, output):
            self.ln_f_calls += 1

        self.handles = [
            model.transformer.wte.register_forward_hook(on_embed),
            model.transformer.adapter.register_forward_pre_hook(on_adapter),
            model.transformer.core_block[-1].register_forward_hook(on_exit),
            model.transformer.ln_f.register_forward_hook(on_ln_f),
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def iterated(self):
        """Groups that ran at least one iteration (Huginn embeds the prompt once more to shape a warm start)."""
        return [g for g in self.groups if g["states"]]


class RowDepths:
    """An exit evaluator in Huginn's protocol that lets row b exit after ``depths[b]`` iterations."""

    def __init__(self, depths):
        self.depths = torch.tensor(depths)

    def init(self, latents):
        self.step = 0

    def check(self, model, latents, aux):
        self.step += 1
        values = (self.depths - self.step).float()
        return values <= 0, None, values


def _generate(model, ids, seed=0, **kwargs):
    torch.manual_seed(seed)
    return model.generate(ids, do_sample=False, **kwargs)


@pytest.mark.parametrize("criterion, threshold", [("kl", 1e-4), ("latent-diff", 0.02)])
def test_adaptive_exit_gives_each_token_its_own_depth(reference_model, prompt_ids, tmp_path, criterion, threshold):
    options = dict(max_new_tokens=8, num_steps=24, criterion=criterion, exit_threshold=threshold)
    plain = _generate(reference_model, prompt_ids, **options)
    recorder = GroupRecorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "a.h5") as capture:
        hooked = _generate(reference_model, prompt_ids, **options)
    recorder.remove()
    assert torch.equal(plain, hooked)

    groups = recorder.iterated()
    expected_steps = np.concatenate([np.full(g["tokens"], len(g["states"])) for g in groups])
    expected = torch.cat([torch.stack([g["s0"]] + g["states"], dim=2)[0] for g in groups[:1]], dim=0)
    prompt_len = prompt_ids.shape[1]
    with loopscope.open(tmp_path / "a.h5") as capture:
        (run,) = capture.runs
        assert run.attrs["call"] == "generate"
        assert run.num_tokens == prompt_len + len(groups) - 1
        np.testing.assert_array_equal(run.token_ids, hooked[0, : run.num_tokens].numpy())
        np.testing.assert_array_equal(run.forward_index, [0] * prompt_len + list(range(1, len(groups))))
        np.testing.assert_array_equal(run.num_steps, expected_steps)
        assert len(set(run.num_steps[prompt_len:].tolist())) > 1, "the criterion should exit tokens at different depths"
        np.testing.assert_array_equal(run.states()[:prompt_len, : len(groups[0]["states"]) + 1], expected.numpy())
        for t, g in enumerate(groups[1:], start=prompt_len):
            np.testing.assert_array_equal(
                run.states(token=t), torch.stack([g["s0"]] + g["states"], dim=2)[0, 0].numpy()
            )
        assert capture.meta["orphan_loop_calls"] == 0
    if criterion == "kl":  # each check decodes the latents through ln_f and the coda: never counted as iterations
        assert recorder.ln_f_calls > 2 * int(expected_steps.sum() / prompt_len)


def test_latent_diff_exit_values_are_stored_as_a_signal(reference_model, prompt_ids, tmp_path):
    with loopscope.attach(reference_model, tmp_path / "s.h5"):
        _generate(
            reference_model, prompt_ids, max_new_tokens=4, num_steps=16, criterion="latent-diff", exit_threshold=0.02
        )
    with loopscope.open(tmp_path / "s.h5") as capture:
        (run,) = capture.runs
        assert run.signal_names() == ["exit_value"]
        values = run.signal("exit_value")
        states = run.states().astype(np.float64)
        assert values.shape == states.shape[:2]
        prompt_len = prompt_ids.shape[1]
        # Huginn's latent-diff: ||s_k - s_(k-1)|| / ||s_k|| averaged over the group's positions, stored on its last
        ends = [prompt_len - 1] + list(range(prompt_len, run.num_tokens))
        starts = [0] + list(range(prompt_len, run.num_tokens))
        for first, last in zip(starts, ends):
            n = int(run.num_steps[last])
            s = states[first : last + 1, : n + 1]
            change = np.linalg.norm(s[:, 1:] - s[:, :-1], axis=-1) / np.linalg.norm(s[:, 1:], axis=-1)
            np.testing.assert_allclose(values[last, 1 : n + 1], change.mean(axis=0), rtol=1e-4)
            assert values[last, n] < 0.02 <= values[last, n - 1] or n == 16
            assert np.isnan(values[first:last]).all()


def test_batch_rows_keep_their_own_exit_step(reference_model, tmp_path):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    options = dict(max_new_tokens=3, num_steps=10, eos_token_id=None, pad_token_id=0)
    plain = _generate(reference_model, ids, exit_evaluator=RowDepths([3, 6]), **options)
    with loopscope.attach(reference_model, tmp_path / "b.h5"):
        hooked = _generate(reference_model, ids, exit_evaluator=RowDepths([3, 6]), **options)
    assert torch.equal(plain, hooked)
    with loopscope.open(tmp_path / "b.h5") as capture:
        runs = capture.runs
        assert [r.attrs["batch_row"] for r in runs] == [0, 1]
        np.testing.assert_array_equal(runs[0].num_steps, np.full(6, 3))
        np.testing.assert_array_equal(runs[1].num_steps, np.full(6, 6))
        # the batch iterated 6 times; row 0's later iterations are stored after its exit, and analysis ignores them
        assert runs[0].dataset().shape[1] == 7
        assert runs[0].states(token=0).shape == (4, reference_model.config.n_embd)
        np.testing.assert_array_equal(runs[1].signal("exit_value")[3, 1:7], [5, 4, 3, 2, 1, 0])


def test_forward_with_adaptive_compute_runs_token_by_token(reference_model, prompt_ids, tmp_path):
    from loopscope.models.huginn_reference import get_adaptive_exit_evaluator

    torch.manual_seed(0)
    plain = reference_model.forward_with_adaptive_compute(
        prompt_ids, get_adaptive_exit_evaluator(reference_model, "kl", 1e-4)
    )
    recorder = GroupRecorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "f.h5"):
        torch.manual_seed(0)
        hooked = reference_model.forward_with_adaptive_compute(
            prompt_ids, get_adaptive_exit_evaluator(reference_model, "kl", 1e-4)
        )
    recorder.remove()
    assert torch.equal(plain.logits, hooked.logits)
    with loopscope.open(tmp_path / "f.h5") as capture:
        (run,) = capture.runs
        assert run.attrs["call"] == "forward_with_adaptive_compute"
        np.testing.assert_array_equal(run.token_ids, prompt_ids[0].numpy())
        np.testing.assert_array_equal(run.num_steps, hooked.stats["compute_steps"])
        for t, g in enumerate(recorder.iterated()):
            np.testing.assert_array_equal(
                run.states(token=t), torch.stack([g["s0"]] + g["states"], dim=2)[0, 0].numpy()
            )


def test_continuous_compute_s0_is_the_previous_tokens_state(reference_model, prompt_ids, tmp_path):
    """Adaptive decoding with ``continuous_compute``: each token starts where the previous one exited."""
    options = dict(max_new_tokens=5, num_steps=16, criterion="kl", exit_threshold=1e-4, continuous_compute=True)
    plain = _generate(reference_model, prompt_ids, **options)
    with loopscope.attach(reference_model, tmp_path / "c.h5"):
        hooked = _generate(reference_model, prompt_ids, **options)
    assert torch.equal(plain, hooked)
    with loopscope.open(tmp_path / "c.h5") as capture:
        (run,) = capture.runs
        assert run.num_tokens == prompt_ids.shape[1] + 4  # the prompt embedded for the warm start is not a token
        for t in range(prompt_ids.shape[1] - 1, run.num_tokens - 1):
            np.testing.assert_array_equal(run.states(token=t + 1)[0], run.states(token=t)[-1])


def test_continuous_compute_minimal_decoding_warm_starts_from_latent_states(reference_model, prompt_ids, tmp_path):
    """``generate(continuous_compute=True)`` without a criterion: s0 of token t+1 is token t's ``latent_states``
    (``ln_f`` of its last state), checked against the model's own outputs."""
    plain = _generate(reference_model, prompt_ids, max_new_tokens=4, num_steps=5, continuous_compute=True)
    latents = []
    hook = reference_model.register_forward_hook(lambda m, a, out: latents.append(out.latent_states[:, -1].clone()))
    with loopscope.attach(reference_model, tmp_path / "m.h5"):
        hooked = _generate(reference_model, prompt_ids, max_new_tokens=4, num_steps=5, continuous_compute=True)
    hook.remove()
    assert torch.equal(plain, hooked)
    with loopscope.open(tmp_path / "m.h5") as capture:
        (run,) = capture.runs
        prompt_len = prompt_ids.shape[1]
        for k, t in enumerate(range(prompt_len, run.num_tokens)):
            np.testing.assert_array_equal(run.states(token=t)[0], latents[k][0].numpy())


def test_test_time_noise_extra_norm_calls_are_not_iterations(tokenizer, tmp_path):
    torch.manual_seed(0)
    config = tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer), test_time_noise=0.3)
    model = RavenReferenceForCausalLM(config).eval()
    ids = tokenizer("Noise on every step.", return_tensors="pt").input_ids
    norm_calls = []
    hook = model.transformer.core_block[-1].norm_4.register_forward_hook(lambda *a: norm_calls.append(1))
    plain = _generate(model, ids, max_new_tokens=3, num_steps=6)
    recorder = GroupRecorder(model)
    with loopscope.attach(model, tmp_path / "n.h5"):
        hooked = _generate(model, ids, max_new_tokens=3, num_steps=6)
    recorder.remove()
    hook.remove()
    assert torch.equal(plain, hooked)
    assert len(norm_calls) == 2 * 2 * 3 * 6  # twice per iteration (noise renorm + block), 3 forwards, 2 runs
    with loopscope.open(tmp_path / "n.h5") as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.num_steps, np.full(run.num_tokens, 6))
        groups = recorder.iterated()
        np.testing.assert_array_equal(
            run.states()[: ids.shape[1]], torch.stack([groups[0]["s0"]] + groups[0]["states"], dim=2)[0].numpy()
        )


def test_generate_default_depth_is_mean_recurrence_and_mask_is_recorded_as_given(reference_model, tmp_path):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with loopscope.attach(reference_model, tmp_path / "d.h5"):
        _generate(reference_model, ids, attention_mask=mask, max_new_tokens=2)
    with loopscope.open(tmp_path / "d.h5") as capture:
        assert "ignores attention_mask" in " ".join(capture.meta["loop_json"]["notes"])
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.num_steps, np.full(5, reference_model.config.mean_recurrence))
            np.testing.assert_array_equal(run.attention_mask[:4], mask[row].numpy())


def test_a_hand_rolled_loop_outside_generate_is_counted_not_guessed(reference_model, prompt_ids, tmp_path):
    """Sub-module calls with no call loopscope can label (here: the caller's own loop) are never recorded as
    tokens: they are counted, reported at close and stored as orphan calls."""
    with pytest.warns(UserWarning, match="3 loop call"):
        with loopscope.attach(reference_model, tmp_path / "o.h5"):
            embedded, block_idx = reference_model.embed_inputs(prompt_ids)
            x = reference_model.initialize_state(embedded)
            for step in range(3):
                x, block_idx, _ = reference_model.iterate_one_step(embedded, x, block_idx=block_idx, current_step=step)
    with loopscope.open(tmp_path / "o.h5") as capture:
        assert capture.runs == [] and capture.meta["orphan_loop_calls"] == 3


@pytest.mark.parametrize(
    "method, options",
    [
        ("generate_with_adaptive_compute", dict(criterion="kl", exit_threshold=1e-4, num_steps=24)),
        ("generate_minimal", dict(continuous_compute=True, num_steps=5)),
    ],
)
def test_huginns_decoders_called_by_name_are_captured_as_generate_is(
    reference_model, prompt_ids, tmp_path, method, options
):
    """Huginn's model card calls its decoders by name; each call is one run, the same as generate() dispatching to
    that decoder (before, the adaptive one recorded nothing and the minimal one a run per token)."""
    paths = {}
    for name in ("generate", method):
        paths[name] = tmp_path / f"{name}.h5"
        with loopscope.attach(reference_model, paths[name]):
            torch.manual_seed(0)
            getattr(reference_model, name)(prompt_ids, max_new_tokens=6, do_sample=False, **options)
    with loopscope.open(paths["generate"]) as via_generate, loopscope.open(paths[method]) as by_name:
        (want,), (got,) = via_generate.runs, by_name.runs
        assert got.attrs["call"] == method and got.num_tokens == want.num_tokens > prompt_ids.shape[1]
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(got.num_steps, want.num_steps)
        np.testing.assert_array_equal(got.states(), want.states())
        assert by_name.meta["orphan_loop_calls"] == 0
        # figures part the prompt from the decoded tokens for it as for generate() (it was generate()'s alone)
        assert prompt_rows(got) == prompt_rows(want) == prompt_ids.shape[1]


class SpeculativeShaped(RavenReferenceForCausalLM):
    """Huginn's ``generate_speculative`` drives forward() itself, token by token with its cache (a prefill, then a
    draft and a verifying pass per token in the real code); called by name it is one decoding call, not a
    forward() run per pass."""

    def generate_speculative(self, input_ids, max_new_tokens: int = 3, num_steps: int = 4, **kwargs):
        with torch.no_grad():
            out = self(input_ids, num_steps=num_steps, use_cache=True)
            ids = input_ids
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, out.logits[:, -1:].argmax(-1)], dim=1)
                out = self(ids[:, -1:], num_steps=num_steps, past_key_values=out.past_key_values, use_cache=True)
        return ids


def test_huginns_speculative_decoder_called_by_name_is_one_run(new_reference_model, prompt_ids, tmp_path):
    plain = new_reference_model()
    model = SpeculativeShaped(plain.config).eval()
    model.load_state_dict(plain.state_dict())
    want = model.generate_speculative(prompt_ids)
    path = tmp_path / "s.h5"
    with loopscope.attach(model, path, tokens="generated"):
        got = model.generate_speculative(prompt_ids)
    assert torch.equal(got, want)
    with loopscope.open(path) as capture:
        (run,) = capture.runs  # a forward() run per pass before, and none with tokens="generated"
        assert run.attrs["call"] == "generate_speculative"
        assert run.positions.tolist() == list(range(prompt_ids.shape[1], got.shape[1]))  # each token fed back


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("generate", {"criterion": "kl", "exit_threshold": 1e-3}),
        ("generate_with_adaptive_compute", {"criterion": "kl", "exit_threshold": 1e-3}),
        ("generate_minimal", {}),
    ],
)
def test_prompt_and_generated_tokens_are_told_apart_in_huginns_decoders(
    reference_model, prompt_ids, tmp_path, method, options
):
    """tokens="prompt" keeps the prompt's tokens and tokens="generated" those decoded and fed back, whichever
    decoder runs, called through generate() or by name (before, by name: every token counted as prompt)."""
    prompt = prompt_ids.shape[1]
    for selection in ("prompt", "generated"):
        path = tmp_path / f"{selection}.h5"
        with loopscope.attach(reference_model, path, tokens=selection):
            getattr(reference_model, method)(prompt_ids, num_steps=6, max_new_tokens=4, do_sample=False, **options)
        with loopscope.open(path) as capture:
            (run,) = capture.runs
            want = range(prompt) if selection == "prompt" else range(prompt, prompt + 3)
            assert run.positions.tolist() == list(want)


def test_prompt_and_generated_tokens_after_a_cache_that_holds_the_prompts_start(reference_model, prompt_ids, tmp_path):
    """generate() given a cache holding the prompt's first tokens (a chat's earlier turn) computes the rest only:
    the run starts there, and its prompt part ends where the prompt does, not the prompt's length later."""
    cached, prompt = 4, prompt_ids.shape[1]
    with torch.no_grad():
        first = reference_model.generate(
            prompt_ids[:, :cached], num_steps=3, max_new_tokens=1, do_sample=False, return_dict_in_generate=True
        )
    assert first.past_key_values.get_seq_length() == cached
    for selection, want in (("prompt", range(cached, prompt)), ("generated", range(prompt, prompt + 3))):
        path = tmp_path / f"{selection}.h5"
        cache = copy.deepcopy(first.past_key_values)
        with loopscope.attach(reference_model, path, tokens=selection), torch.no_grad():
            reference_model.generate(prompt_ids, past_key_values=cache, num_steps=3, max_new_tokens=4, do_sample=False)
        with loopscope.open(path) as capture:
            (run,) = capture.runs
            assert run.positions.tolist() == list(want)
