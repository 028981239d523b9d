"""The capture spine on the Huginn-shaped reference model: outputs untouched, states exact, labels right."""

from __future__ import annotations

import threading

import h5py
import numpy as np
import pytest
import torch
from child_runs import run_script

import loopscope
from loopscope.errors import CaptureFileError, LoopNotFoundError, LoopscopeError
from loopscope.storage.write import writer as w


def _forward_logits(model, ids, steps, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        return model(ids, num_steps=steps).logits


def test_forward_logits_bit_identical(reference_model, prompt_ids, tmp_path):
    plain = _forward_logits(reference_model, prompt_ids, 6)
    with loopscope.attach(reference_model, tmp_path / "run.h5"):
        hooked = _forward_logits(reference_model, prompt_ids, 6)
    assert torch.equal(plain, hooked)


def test_generate_tokens_bit_identical(reference_model, prompt_ids, tmp_path):
    torch.manual_seed(3)
    plain = reference_model.generate(prompt_ids, num_steps=5, max_new_tokens=6, do_sample=True, top_k=20)
    with loopscope.attach(reference_model, tmp_path / "run.h5"):
        torch.manual_seed(3)
        hooked = reference_model.generate(prompt_ids, num_steps=5, max_new_tokens=6, do_sample=True, top_k=20)
    assert torch.equal(plain, hooked)


def test_forward_states_equal_hand_written_capture(reference_model, prompt_ids, reference_recorder, tmp_path):
    steps = 7
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "run.h5"):
        _forward_logits(reference_model, prompt_ids, steps)
    recorder.remove()
    expected = torch.stack([recorder.s0[0]] + recorder.states, dim=2)[0]  # [T, steps+1, H]
    with loopscope.open(tmp_path / "run.h5") as capture:
        (run,) = capture.runs
        assert run.num_tokens == prompt_ids.shape[1]
        np.testing.assert_array_equal(run.token_ids, prompt_ids[0].numpy())
        np.testing.assert_array_equal(run.num_steps, np.full(prompt_ids.shape[1], steps))
        np.testing.assert_array_equal(run.states(), expected.numpy())  # exact, not close
        for t in range(run.num_tokens):
            np.testing.assert_array_equal(run.states(token=t), expected[t].numpy())
        np.testing.assert_array_equal(run.states(step=0), expected[:, 0].numpy())


def test_generate_labels_and_states(reference_model, prompt_ids, reference_recorder, tmp_path):
    steps, new = 4, 5
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "gen.h5"):
        torch.manual_seed(0)
        out = reference_model.generate(prompt_ids, num_steps=steps, max_new_tokens=new, do_sample=False)
    recorder.remove()
    prompt_len = prompt_ids.shape[1]
    with loopscope.open(tmp_path / "gen.h5") as capture:
        (run,) = capture.runs
        assert run.attrs["call"] == "generate"
        # prefill tokens, then one token per decode forward (the last sampled token is never fed back)
        assert run.num_tokens == prompt_len + new - 1
        np.testing.assert_array_equal(run.token_ids, out[0, : prompt_len + new - 1].numpy())
        np.testing.assert_array_equal(run.num_steps, np.full(run.num_tokens, steps))
        np.testing.assert_array_equal(run.forward_index, [0] * prompt_len + list(range(1, new)))
        np.testing.assert_array_equal(run.positions, np.arange(run.num_tokens))
        # the hand-written capture saw forwards of [1, prompt_len] then [1, 1]; rebuild per token
        forwards = len(recorder.states) // steps
        assert forwards == new
        rows = []
        for f in range(forwards):
            s0 = recorder.s0[f * steps]
            trajectory = [s0] + recorder.states[f * steps : (f + 1) * steps]
            rows.append(torch.stack(trajectory, dim=2)[0])
        expected = torch.cat(rows, dim=0)
        np.testing.assert_array_equal(run.states(), expected.numpy())


def test_batch_rows_become_runs(reference_model, tokenizer, tmp_path):
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    torch.manual_seed(0)
    with loopscope.attach(reference_model, tmp_path / "b.h5", tokenizer=tokenizer):
        with torch.no_grad():
            reference_model(ids, attention_mask=mask, num_steps=3)
    with loopscope.open(tmp_path / "b.h5") as capture:
        assert [r.attrs["batch_row"] for r in capture.runs] == [0, 1]
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.token_ids, ids[row].numpy())
            np.testing.assert_array_equal(run.attention_mask, mask[row].numpy())
            assert run.tokens == [tokenizer.decode([int(i)]) for i in ids[row]]
            assert run.states().shape == (4, 4, reference_model.config.n_embd)


def test_num_steps_forms(reference_model, prompt_ids, tmp_path):
    """int, tensor, (no_grad, grad) pair and the config default all label steps by exit-module calls."""
    forms = [3, torch.tensor(4), (2, 3), None]
    expected = [3, 4, 5, reference_model.config.mean_recurrence]
    with loopscope.attach(reference_model, tmp_path / "n.h5"):
        for form in forms:
            with torch.no_grad():
                reference_model(prompt_ids, num_steps=form)
    with loopscope.open(tmp_path / "n.h5") as capture:
        assert [int(r.num_steps[0]) for r in capture.runs] == expected
        assert [r.dataset().shape[1] for r in capture.runs] == [n + 1 for n in expected]


def test_hooks_removed_after_close(reference_model, prompt_ids, tmp_path):
    had_generate = "generate" in vars(reference_model)
    capture = loopscope.attach(reference_model, tmp_path / "h.h5")
    assert any(m._forward_hooks or m._forward_pre_hooks for m in reference_model.modules())
    assert "forward" in vars(reference_model) and "generate" in vars(reference_model)
    capture.close()
    capture.close()  # idempotent
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in reference_model.modules())
    assert ("generate" in vars(reference_model)) == had_generate
    assert "forward" not in vars(reference_model)
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=2)  # nothing recorded, nothing raised
    with loopscope.open(tmp_path / "h.h5") as f:
        assert f.runs == []


def test_the_loops_entry_is_hooked_only_until_it_has_read_s0(reference_model, prompt_ids, tmp_path):
    """A hooked module takes torch's slower call path at every call, and the loop's entry (the adapter) is called
    at every step: loopscope's hook on it reads s0 at each forward's first step and is off for the rest."""
    adapter = reference_model.transformer.adapter
    with loopscope.attach(reference_model, tmp_path / "e.h5"):
        assert adapter._forward_pre_hooks  # on until a forward reads s0
        with torch.no_grad():
            torch.manual_seed(0)
            reference_model.generate(prompt_ids, num_steps=4, max_new_tokens=3, do_sample=False)
            assert not adapter._forward_pre_hooks
            torch.manual_seed(0)
            reference_model(prompt_ids, num_steps=2)
            assert not adapter._forward_pre_hooks
    with loopscope.open(tmp_path / "e.h5") as capture:
        generated, forward = capture.runs
        s0 = generated.states(step=0)  # one s0 per forward: the prompt's, then each decoded token's
        assert generated.num_tokens == prompt_ids.shape[1] + 2 and np.isfinite(s0).all()
        assert not np.array_equal(s0[-1], s0[-2])  # drawn afresh for each forward (random s0)
        np.testing.assert_array_equal(forward.states(step=0), s0[: prompt_ids.shape[1]])  # same seed, same draw


def test_states_are_what_the_model_passes_on_after_hooks_registered_later(reference_model, prompt_ids, tmp_path):
    """A user's steering hooks registered after attach(): s0 is what the loop's entry receives after the user's
    pre-hook (in the first forward too, where loopscope's hook was registered first), and each step is the exit's
    output after the user's forward hook, i.e. what the next iteration reads."""
    adapter, exit_block = reference_model.transformer.adapter, reference_model.transformer.core_block[-1]
    received: list[torch.Tensor] = []  # the state part of what the adapter receives, each call (3 per forward)
    width = reference_model.config.n_embd

    def steer_s0(module, args):  # shifts s0 only: the adapter's first call of each forward
        if len(received) % 3:
            return None
        return (torch.cat([args[0][..., :width] + 100, args[0][..., width:]], -1),)

    with loopscope.attach(reference_model, tmp_path / "s.h5"):
        handles = [
            adapter.register_forward_pre_hook(steer_s0),
            exit_block.register_forward_hook(lambda m, a, out: out * 0.5),
            adapter.register_forward_pre_hook(lambda m, a: received.append(a[0][..., :width].clone())),
        ]
        try:
            with torch.no_grad():
                for _ in range(2):
                    torch.manual_seed(0)
                    reference_model(prompt_ids, num_steps=3)
        finally:
            for handle in handles:
                handle.remove()
    with loopscope.open(tmp_path / "s.h5") as capture:
        assert len(capture.runs) == 2 and len(received) == 6
        for run, seen in zip(capture.runs, (received[:3], received[3:])):
            stored = np.stack([run.states(token=t) for t in range(run.num_tokens)], 1)  # [steps + 1, T, E]
            for step in range(3):  # s0 and s1, s2 as the adapter reads them
                np.testing.assert_array_equal(stored[step], seen[step][0].numpy())


def test_file_is_self_describing_in_plain_h5py(reference_model, prompt_ids, tmp_path):
    with loopscope.attach(reference_model, tmp_path / "m.h5", tokenizer=None):
        _forward_logits(reference_model, prompt_ids, 2)
    with h5py.File(tmp_path / "m.h5.runs" / "000000.h5", "r") as run_file:
        # libver v110 (schema.LIBVER): superblock v3 and the 1.10 chunk indexes for resizable datasets
        assert run_file.id.get_create_plist().get_version()[0] >= 2
    with h5py.File(tmp_path / "m.h5", "r") as f:
        # strings are fixed-length, marked utf-8 (no global heap): plain h5py gives bytes
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in f.attrs.items()}
        assert attrs["format"] == "loopscope-capture" and attrs["format_version"] == 1
        for key in (
            "loopscope_version",
            "torch_version",
            "transformers_version",
            "model_class",
            "created",
            "config_json",
            "loop_json",
            "options_json",
            "model_dtype",
        ):
            assert key in attrs, key
        assert "RavenReferenceForCausalLM" in attrs["model_class"]
        assert '"core_block.1"' not in attrs["loop_json"]  # full paths, not fragments
        assert "transformer.core_block.1" in attrs["loop_json"]
        np.testing.assert_array_equal(f["readout/weight"][()], reference_model.transformer.ln_f.weight.detach().numpy())
        assert f["readout"].attrs["kind"] == b"rmsnorm"
        states = f["runs/000000/loops/core/states"]
        assert states.chunks is not None and states.maxshape[0] is None


def test_bfloat16_stored_losslessly(reference_model, prompt_ids, reference_recorder, tmp_path):
    model = reference_model.to(torch.bfloat16)
    recorder = reference_recorder(model)
    with loopscope.attach(model, tmp_path / "bf.h5"):
        _forward_logits(model, prompt_ids, 3)
    recorder.remove()
    last = recorder.states[-1][0]
    with loopscope.open(tmp_path / "bf.h5") as capture:
        run = capture.runs[0]
        assert run.logical_dtype() == "bfloat16"
        raw = run.states(step=3, raw=True)
        assert raw.dtype == np.uint16
        np.testing.assert_array_equal(raw, last.view(torch.int16).numpy().view(np.uint16))
        np.testing.assert_array_equal(run.states(step=3), last.float().numpy())


def test_readout_space_matches_model_norm(reference_model, prompt_ids, tmp_path):
    with loopscope.attach(reference_model, tmp_path / "r.h5"):
        _forward_logits(reference_model, prompt_ids, 5)
    with loopscope.open(tmp_path / "r.h5") as capture:
        run = capture.runs[0]
        states = run.states()
        with torch.no_grad():
            expected = reference_model.transformer.ln_f(torch.from_numpy(states)).double().numpy()
        np.testing.assert_allclose(capture.readout(states), expected, rtol=1e-5, atol=1e-5)


def test_small_buffer_budget_splits_and_still_exact(reference_model, prompt_ids, reference_recorder, tmp_path):
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "s.h5", buffer_mb=0.001) as cap:
        _forward_logits(reference_model, prompt_ids, 3)
    recorder.remove()
    assert 0 < cap.pool.stats.peak_bytes <= int(0.001 * (1 << 20))
    with loopscope.open(tmp_path / "s.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].states(step=3), recorder.states[-1][0].numpy())


def test_loop_override_and_errors(reference_model, prompt_ids, tmp_path):
    with loopscope.attach(reference_model, tmp_path / "o.h5", loop="transformer.core_block.1") as cap:
        _forward_logits(reference_model, prompt_ids, 2)
    assert cap.adapter.family == "custom"
    with pytest.raises(LoopNotFoundError, match="ModuleList"):
        loopscope.attach(reference_model, tmp_path / "x.h5", loop="transformer.core_block")
    with pytest.raises(LoopNotFoundError, match="no such module"):
        loopscope.attach(reference_model, tmp_path / "x.h5", loop="transformer.nope")
    with pytest.raises(CaptureFileError, match="already exists"):
        loopscope.attach(reference_model, tmp_path / "o.h5")
    with pytest.raises(CaptureFileError, match="does not exist"):
        loopscope.attach(reference_model, tmp_path / "missing" / "o.h5")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in reference_model.modules())


def test_model_without_loop_lists_candidates(tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 10))
    with pytest.raises(LoopNotFoundError, match="no loop found") as info:
        loopscope.attach(model, tmp_path / "none.h5")
    assert "considered" in str(info.value)
    assert not (tmp_path / "none.h5").exists()


def test_append_mode_continues_run_numbers(reference_model, prompt_ids, tmp_path):
    path = tmp_path / "a.h5"
    with loopscope.attach(reference_model, path):
        _forward_logits(reference_model, prompt_ids, 2)
    with loopscope.attach(reference_model, path, mode="a"):
        _forward_logits(reference_model, prompt_ids, 3)
    with loopscope.open(path) as capture:
        assert [r.index for r in capture.runs] == [0, 1]
        assert [int(r.num_steps[0]) for r in capture.runs] == [2, 3]


def test_bad_options_are_one_line_errors(reference_model, tmp_path):
    bad = [
        ({"dtype": "int8"}, "dtype"),
        ({"mode": "r"}, "mode"),
        ({"bogus": 1}, "unknown"),
        ({"buffer_mb": "64"}, "buffer_mb"),
        ({"buffer_mb": float("nan")}, "buffer_mb"),
        ({"buffer_mb": 0}, "buffer_mb"),
        ({"chunks": (4,)}, "chunks"),
        ({"chunks": "auto"}, "chunks"),
        ({"chunks": (0, 4)}, "chunks"),
        ({"chunks": (2.5, 2)}, "chunks"),
        ({"chunks": (4, 2, 64)}, "chunks"),
        ({"tokenizer": object()}, "decode"),
        ({"tokens": []}, "selects no token"),
        ({"tokens": slice(5, 2)}, "selects no token"),
    ]
    for kwargs, pattern in bad:
        with pytest.raises(LoopscopeError, match=pattern):
            loopscope.attach(reference_model, tmp_path / "e.h5", **kwargs)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in reference_model.modules())


def test_inputs_reused_after_the_forward_do_not_change_what_is_stored(reference_model, tmp_path, monkeypatch):
    """The writer trails the model; a caller that refills its input buffers for the next forward (as static-cache
    decoding loops do) must not change the ids, mask or positions already recorded: the hooks keep their own copy.
    The writer is held back until the buffers have been overwritten."""
    gate = threading.Event()
    write_tokens = w.CaptureWriter._write_tokens

    def held_back(self, message):
        gate.wait(30)
        write_tokens(self, message)

    monkeypatch.setattr(w.CaptureWriter, "_write_tokens", held_back)
    ids = torch.arange(3, 19).unsqueeze(0)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    positions = torch.arange(100, 116).unsqueeze(0)
    expected = ids.clone(), mask.clone(), positions.clone()
    cap = loopscope.attach(reference_model, tmp_path / "c.h5")
    with torch.no_grad():
        reference_model(ids, attention_mask=mask, position_ids=positions, num_steps=3)
    for buffer in (ids, mask, positions):
        buffer.fill_(7)
    gate.set()
    cap.close()
    with loopscope.open(tmp_path / "c.h5") as capture:
        run = capture.runs[0]
        for stored, want in zip((run.token_ids, run.attention_mask, run.positions), expected):
            np.testing.assert_array_equal(stored, want[0].numpy())


def test_forwards_in_and_out_of_inference_mode_share_one_capture(
    reference_model, prompt_ids, reference_recorder, tmp_path
):
    """Slabs made during an inference_mode forward are reused by the next forwards, under no_grad too: they are
    made as normal tensors, which both modes may copy into (an inference tensor refuses it outside the mode)."""
    recorder = reference_recorder(reference_model)
    with loopscope.attach(reference_model, tmp_path / "modes.h5") as capture:
        for mode in (torch.inference_mode, torch.inference_mode, torch.no_grad, torch.inference_mode):
            with mode():
                reference_model(prompt_ids, num_steps=3)
            capture.flush()  # the slab is back in the pool before the next forward
    recorder.remove()
    with loopscope.open(tmp_path / "modes.h5") as f:
        assert len(f.runs) == 4
        for index, run in enumerate(f.runs):
            want = torch.stack([recorder.s0[3 * index]] + recorder.states[3 * index : 3 * index + 3], dim=2)[0]
            np.testing.assert_array_equal(run.states(), want.numpy())


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_a_last_state_changed_in_place_is_kept_as_the_hook_saw_it(tmp_path, state_changed_in_place, mode):
    """With step_stride the last iteration is held until the forward ends, as a copy: a model that changes it in
    place afterwards (``h += inp``) still has it stored as returned, and its forward calls are unaffected."""
    model = state_changed_in_place(hidden=8, steps=5)
    ids = torch.zeros(1, 3, dtype=torch.long)
    with mode():
        plain = model(input_ids=ids)
        with loopscope.attach(model, tmp_path / "c.h5", loop="block", step_stride=2):
            for _ in range(2):
                assert torch.equal(model(input_ids=ids), plain)
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert len(capture.runs) == 2
        states = capture.runs[1].states()  # s0, iterations 2 and 4, then the last one, 5
    np.testing.assert_array_equal(states[:, :, 0], np.broadcast_to(model.expected()[[0, 2, 4, 5]], states.shape[:2]))


@pytest.mark.parametrize("first_closed", ["first attached", "last attached"])
def test_two_captures_on_one_model_leave_it_as_it_was(reference_model, prompt_ids, tmp_path, first_closed):
    """Closed in either order, two captures leave no wrapper behind: a deep copy of the model then runs its own
    weights (a leftover wrapper is bound to the original model and would run that instead)."""
    import copy

    wrapped = ("forward", "generate")
    a = loopscope.attach(reference_model, tmp_path / "a.h5")
    b = loopscope.attach(reference_model, tmp_path / "b.h5")
    with torch.no_grad():
        reference_model(prompt_ids, num_steps=2)  # both record it
    for cap in (a, b) if first_closed == "first attached" else (b, a):
        cap.close()
    assert not [name for name in wrapped if name in vars(reference_model)]
    for path in (a.path, b.path):
        with loopscope.open(path) as capture:
            assert len(capture.runs) == 1
    twin = copy.deepcopy(reference_model)
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
        torch.manual_seed(0)
        assert not torch.equal(twin(prompt_ids, num_steps=2).logits, reference_model(prompt_ids, num_steps=2).logits)


def test_beam_search_is_refused_and_the_capture_goes_on(reference_model, prompt_ids, tmp_path):
    """Beam search reorders the batch rows at every step, so no row is one sequence: generate(num_beams>1) is a
    one-line error before the model runs, and the capture records the next call as usual."""
    from transformers import GenerationConfig

    with loopscope.attach(reference_model, tmp_path / "beams.h5") as capture:
        for options in (dict(num_beams=3), dict(generation_config=GenerationConfig(num_beams=2, max_new_tokens=3))):
            with pytest.raises(LoopscopeError, match="use num_beams=1"):
                reference_model.generate(prompt_ids, num_steps=2, max_new_tokens=3, **options)
        reference_model.generate(prompt_ids, num_steps=2, max_new_tokens=3, num_beams=1, do_sample=False)
    with loopscope.open(capture.path) as f:
        (run,) = f.runs
        assert run.num_tokens == prompt_ids.shape[1] + 2


def test_append_refuses_another_model_and_keeps_the_capture(
    new_reference_model, prompt_ids, tmp_path, state_changed_in_place
):
    """mode="a" adds runs of the model the capture describes only: another checkpoint (its final norm differs)
    would be read out through the stored norm, silently wrong; another model class is refused too."""
    path = tmp_path / "a.h5"
    model = new_reference_model()
    with loopscope.attach(model, path), torch.no_grad():
        model(prompt_ids, num_steps=2)
    tuned = new_reference_model()
    with torch.no_grad():
        tuned.transformer.ln_f.weight.mul_(3.0)
    with pytest.raises(LoopscopeError, match="stores another readout norm than this model's transformer.ln_f"):
        loopscope.attach(tuned, path, mode="a")
    with pytest.raises(LoopscopeError, match="holds runs of .*RavenReferenceForCausalLM"):
        loopscope.attach(state_changed_in_place(hidden=8), path, mode="a", loop="block")
    same = new_reference_model()  # the same checkpoint, loaded again: appended
    with loopscope.attach(same, path, mode="a"), torch.no_grad():
        same(prompt_ids, num_steps=3)
    with loopscope.open(path) as capture:
        assert [r.num_steps.max() for r in capture.runs] == [2, 3]


class _NanoLooped(torch.nn.Module):
    """A looped model in the style of research code: ``forward(idx)``, or float features with no token ids."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 8)
        self.block = torch.nn.Linear(8, 8)

    def forward(self, idx=None, features=None):
        x = self.emb(idx) if idx is not None else features
        for _ in range(3):
            x = torch.tanh(self.block(x))
        return x


def test_generic_models_called_without_input_ids_are_captured(tmp_path):
    """nanoGPT's ``model(idx=...)`` is recorded with its token ids; a model over float features [B, T, F], with
    ids -1 (before, both failed on every call)."""
    torch.manual_seed(0)
    model = _NanoLooped().eval()
    ids = torch.randint(0, 50, (1, 7))
    features = torch.randn(1, 5, 8)
    with torch.no_grad():
        plain = model(idx=ids), model(features=features)
    seen = []  # what plain hooks see: the block's first input (s0), then each output
    hooks = [
        model.block.register_forward_pre_hook(lambda m, a: None if len(seen) % 4 else seen.append(a[0])),
        model.block.register_forward_hook(lambda m, a, out: seen.append(out.clone())),
    ]
    with loopscope.attach(model, tmp_path / "nano.h5", loop="block"), torch.no_grad():
        hooked = model(idx=ids), model(features=features)
    for hook in hooks:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, hooked))
    with loopscope.open(tmp_path / "nano.h5") as capture:
        by_ids, by_features = capture.runs
        np.testing.assert_array_equal(by_ids.token_ids, ids[0].numpy())
        np.testing.assert_array_equal(by_features.token_ids, np.full(5, -1))
        for run, states in ((by_ids, seen[:4]), (by_features, seen[4:])):
            np.testing.assert_array_equal(run.states(), torch.stack(states, dim=2)[0].numpy())


@pytest.mark.parametrize("direct", [False, True], ids=["model(...)", "model.forward(...)"])
def test_a_call_of_the_model_inside_its_own_forward_is_not_recorded(
    reference_model, prompt_ids, reference_recorder, tmp_path, direct
):
    """A user's hook that runs the model during its forward (as ``model(...)``, or ``model.forward(...)``, which is
    recorded as ``model(...)`` is): the outer forward is recorded whole and exact (before, it was left incomplete),
    the inner call is left out with a warning."""
    probed = []

    def probe(module, args, output):
        if not probed:
            probed.append(True)
            (reference_model.forward if direct else reference_model)(prompt_ids[:, :3], num_steps=2)

    with torch.no_grad():
        inner = reference_model.transformer.core_block[-1].register_forward_hook(probe)
        recorder = reference_recorder(reference_model)  # its hook runs after the probe's
        with loopscope.attach(reference_model, tmp_path / "n.h5"), pytest.warns(UserWarning, match="not recorded"):
            reference_model(prompt_ids, num_steps=4)
        inner.remove()
        recorder.remove()
    outer = [recorder.s0[0]] + recorder.states[2:]  # the inner call's two iterations came first
    with loopscope.open(tmp_path / "n.h5") as capture:
        (run,) = capture.runs
        assert run.num_tokens == prompt_ids.shape[1] and capture.meta["orphan_loop_calls"] == 0
        np.testing.assert_array_equal(run.states(), torch.stack(outer, dim=2)[0].numpy())


_BIG_BATCH = """
import resource, sys, torch, loopscope
from loopscope.errors import LoopscopeError
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
path, soft, hard, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
register(); torch.manual_seed(0)
model = RavenReferenceForCausalLM(tiny_config()).eval()
ids = torch.randint(3, 100, (batch, 4))
with torch.no_grad():
    plain = model(ids, num_steps=2, init_scale=0.0).logits
    with loopscope.attach(model, path):
        try:
            print("SAME", torch.equal(plain, model(ids, num_steps=2, init_scale=0.0).logits))
        except LoopscopeError as exc:
            print("REFUSED", exc)
        model(ids[:2], num_steps=2)  # the capture goes on
print("SOFT", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize(
    ("soft", "hard", "outcome"),
    [(800, 800, "kept"), (256, 4096, "raised"), (256, 256, "refused")],
    ids=["one-descriptor-per-run", "soft-limit-raised", "refused-in-one-line"],
)
def test_a_batch_near_the_open_file_limit_keeps_every_run_or_is_refused_before_the_forward(
    tmp_path, soft, hard, outcome
):
    """600 rows: 600 run files open at once. Each costs one descriptor (not two), the soft limit is raised toward
    the hard one where needed, and where even that is too low the forward is refused in one line naming the batch
    and ``ulimit -n``; a later small batch is still recorded."""
    path = tmp_path / "big.h5"
    code, out, err = run_script(_BIG_BATCH, path, soft, hard, 600, timeout=300)
    assert code == 0, err
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    with loopscope.open(path) as capture:
        runs = capture.runs
        assert not capture.incomplete_runs
    if outcome == "refused":
        assert lines["REFUSED"].startswith("a batch of 600 rows") and "ulimit -n" in lines["REFUSED"]
        assert len(runs) == 2
    else:
        assert lines["SAME"] == "True" and len(runs) == 602
        assert (int(lines["SOFT"]) > soft) == (outcome == "raised")
