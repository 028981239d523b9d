"""How people call a captured model beyond ``model(...)`` from one thread: several threads at once, ``model.forward``
called directly (peft's LoRA wrapper), assisted decoding, and a user's own Huginn exit evaluator. What can be
recorded faithfully is, exactly; what cannot is refused in one line or named, and the model's outputs never change.
Expected states come from plain hooks written here, never from loopscope itself."""

from __future__ import annotations

import gc
import os
import threading
import time
import warnings

import h5py
import numpy as np
import pytest
import torch
from child_runs import run_script
from torch import nn

import loopscope
from loopscope.errors import LoopscopeError


def _messages(caught) -> list[str]:
    return [str(w.message) for w in caught]


def test_forwards_of_another_thread_during_a_recorded_one_are_left_out_and_named(
    reference_model, prompt_ids, reference_recorder, tmp_path
):
    """Thread A's forward is paused mid-loop while thread B runs two forwards (another length, other tokens): A's
    run is exact, B's forwards run untouched and unrecorded, close() names them; a forward B runs after A's has
    ended is recorded (one thread at a time is all it takes)."""
    short = prompt_ids[:, :3]
    with torch.no_grad():  # init_scale=0: s0 is zero, not drawn from the RNG that both threads share
        plain_a = reference_model(prompt_ids, num_steps=4, init_scale=0).logits
        plain_b = reference_model(short, num_steps=3, init_scale=0).logits
    paused, resume = threading.Event(), threading.Event()
    owner: list[int] = []

    def pause(module, args, output):  # A's first iteration waits, mid-loop, until B has run
        if threading.get_ident() in owner and not paused.is_set():
            paused.set()
            assert resume.wait(30)

    results: dict[str, object] = {}

    def run(name, ids, steps):
        try:
            with torch.no_grad():
                results[name] = reference_model(ids, num_steps=steps, init_scale=0).logits
        except BaseException as exc:  # reported by the test, not lost in the thread
            results[name] = exc

    def thread_a():
        owner.append(threading.get_ident())
        run("a", prompt_ids, 4)

    def thread_b():
        assert paused.wait(30)
        run("b1", short, 3)
        run("b2", short, 3)
        resume.set()

    path = tmp_path / "threads.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cap = loopscope.attach(reference_model, path)
        recorder = reference_recorder(reference_model)
        pauser = reference_model.transformer.core_block[0].register_forward_hook(pause)
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        pauser.remove()
        later = threading.Thread(target=run, args=("b3", short, 3))  # one thread at a time: recorded
        later.start()
        later.join(60)
        recorder.remove()
        cap.close()
    assert torch.equal(results["a"], plain_a)
    for name in ("b1", "b2", "b3"):
        assert torch.equal(results[name], plain_b), name
    skipped = [m for m in _messages(caught) if "another thread" in m]
    assert skipped == [
        "loopscope: 2 forward(s) ran on another thread while one was being recorded and were not recorded; "
        "run the model from one thread at a time to record every forward"
    ]
    assert not [m for m in _messages(caught) if "inside its own forward" in m]  # not a nested call
    # the adapter's input at each iteration, the last block's output: A's first iteration, B's two forwards, A's
    # other iterations, B3
    assert len(recorder.s0) == len(recorder.states) == 1 + 3 + 3 + 3 + 3
    want_a = torch.stack([recorder.s0[0]] + recorder.states[6:10], dim=2)[0]
    want_b3 = torch.stack([recorder.s0[10]] + recorder.states[10:], dim=2)[0]
    with loopscope.open(path) as capture:
        first, second = capture.runs
        np.testing.assert_array_equal(first.token_ids, prompt_ids[0].numpy())
        np.testing.assert_array_equal(first.states(), want_a.numpy())
        np.testing.assert_array_equal(second.token_ids, short[0].numpy())
        np.testing.assert_array_equal(second.states(), want_b3.numpy())
        assert capture.meta["orphan_loop_calls"] == 0


def test_forwards_of_two_threads_at_once_never_mix(reference_model, tmp_path):
    """Free-running threads, same shapes: each recorded run is one forward of the thread whose tokens it holds."""
    xs = [torch.full((1, 6), 5 + i) for i in range(2)]
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    local = threading.local()
    hook = reference_model.transformer.core_block[-1].register_forward_hook(
        lambda m, a, o: seen[local.i].append(o.detach().clone())
    )
    barrier = threading.Barrier(2)
    errors = []

    def work(i):
        local.i = i
        barrier.wait()
        try:
            with torch.no_grad():
                for _ in range(10):
                    reference_model(xs[i], num_steps=3, init_scale=0)
        except BaseException as exc:
            errors.append(exc)

    path = tmp_path / "free.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loopscope.attach(reference_model, path):
            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    hook.remove()
    assert not errors
    assert not [m for m in _messages(caught) if "inside its own forward" in m]
    named = [m for m in _messages(caught) if "another thread" in m]
    skipped = int(named[0].split()[1]) if named else 0
    with loopscope.open(path) as capture:
        assert len(capture.runs) + skipped == 20  # every forward recorded or counted
        for run in capture.runs:
            i = int(run.token_ids[0]) - 5
            states = run.states()
            forwards = [seen[i][3 * j : 3 * j + 3] for j in range(10)]
            assert any(all(np.array_equal(states[:, k + 1], f[k][0].numpy()) for k in range(3)) for f in forwards)


class _LoraLike(nn.Module):
    """peft's ``BaseTuner.forward``: ``return self.model.forward(*args, **kwargs)``, no module call of the model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.forward(*args, **kwargs)


def test_direct_forward_calls_are_recorded_as_model_calls_are(
    reference_model, prompt_ids, reference_recorder, tmp_path
):
    """``model.forward(...)`` and a LoRA-style wrapper: one run each, states equal to ``model(...)``'s and to plain
    hooks', logits and gradients bit-identical, nothing called an orphan; ``model(...)`` is recorded once."""

    def outputs(call):
        reference_model.zero_grad()
        torch.manual_seed(1)  # Huginn draws s0 at random
        logits = call(prompt_ids, num_steps=3).logits
        logits.float().square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in reference_model.parameters() if p.grad is not None]

    calls = [lambda *a, **k: reference_model.forward(*a, **k), _LoraLike(reference_model), reference_model]
    plain = [outputs(call) for call in calls]
    path = tmp_path / "direct.h5"
    recorder = reference_recorder(reference_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loopscope.attach(reference_model, path):
            hooked = [outputs(call) for call in calls]
    recorder.remove()
    assert not _messages(caught)
    for (logits, grads), (logits_h, grads_h) in zip(plain, hooked):
        assert torch.equal(logits, logits_h)
        assert len(grads) == len(grads_h) and all(torch.equal(g, h) for g, h in zip(grads, grads_h))
    with loopscope.open(path) as capture:
        assert len(capture.runs) == 3 and capture.meta["orphan_loop_calls"] == 0
        for f, run in enumerate(capture.runs):
            assert run.attrs["call"] == "forward"
            np.testing.assert_array_equal(run.token_ids, prompt_ids[0].numpy())
            expected = torch.stack([recorder.s0[3 * f]] + recorder.states[3 * f : 3 * f + 3], dim=2)[0]
            np.testing.assert_array_equal(run.states(), expected.detach().numpy())
        np.testing.assert_array_equal(capture.runs[0].states(), capture.runs[2].states())


def test_assisted_decoding_is_refused_and_the_capture_goes_on(reference_model, tokenizer, tmp_path):
    """Prompt lookup and assistant models decode draft tokens and discard the rejected ones: no run would be one
    sequence. Refused in one line naming the option, before anything runs; the capture records what comes next."""
    from transformers import GenerationConfig

    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    options = dict(num_steps=2, max_new_tokens=4, do_sample=False)
    refused = [
        ("prompt_lookup_num_tokens", dict(prompt_lookup_num_tokens=3)),
        ("prompt_lookup_num_tokens", dict(generation_config=GenerationConfig(prompt_lookup_num_tokens=2))),
        ("assistant_model", dict(assistant_model=reference_model)),
    ]
    path = tmp_path / "assisted.h5"
    with loopscope.attach(reference_model, path):
        for name, extra in refused:
            with pytest.raises(LoopscopeError, match=rf"^generate\({name}=.*assisted .*leave out {name}"):
                reference_model.generate(ids, **options, **extra)
        out = reference_model.generate(ids, **options)
    with loopscope.open(path) as capture:
        (run,) = capture.runs
        assert run.attrs["call"] == "generate"
        np.testing.assert_array_equal(run.token_ids, out[0, :-1].numpy())
        np.testing.assert_array_equal(run.positions, np.arange(run.num_tokens))


class _StopAfter:
    """A user's exit evaluator: every row exits at the third check; its values are ``value`` (None: none)."""

    def __init__(self, value=None):
        self.value = value

    def init(self, latents):
        self.checks = 0

    def check(self, model, latents, aux):
        self.checks += 1
        return torch.full((latents.shape[0],), self.checks >= 3), None, self.value


@pytest.mark.parametrize("value", [None, 0.5, [0.25, 0.75]], ids=["none", "float", "list"])
def test_a_users_exit_evaluator_returning_no_tensors_runs_as_without_loopscope(reference_model, tmp_path, value):
    """Values None, a float or a list: generation is unchanged, each token's depth is the evaluator's, and what the
    values say is stored (a float for every row, a list one per row) on each group's last token."""
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    options = dict(num_steps=8, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    plain = reference_model.generate(ids, exit_evaluator=_StopAfter(value), **options)
    path = tmp_path / "custom.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loopscope.attach(reference_model, path):
            torch.manual_seed(0)
            hooked = reference_model.generate(ids, exit_evaluator=_StopAfter(value), **options)
    assert torch.equal(plain, hooked)
    assert not _messages(caught)
    with loopscope.open(path) as capture:
        assert len(capture.runs) == 2
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.num_steps, np.full(run.num_tokens, 3))
            if value is None:
                assert run.signal_names() == []
                continue
            want = value if isinstance(value, float) else value[row]
            values = run.signal("exit_value")  # [tokens, steps + 1]: the prompt's last token, then each one decoded
            np.testing.assert_array_equal(values[3:, 1:4], np.full((run.num_tokens - 3, 3), want, np.float32))
            assert np.isnan(values[:3]).all()


def test_an_exit_evaluators_unreadable_answers_are_named_once_not_raised(reference_model, tmp_path):
    """Values of a shape that is neither per row nor per token: the model decodes as without loopscope; the values
    are named once, at the caller's line, and not stored; the decisions are read."""

    class OddValues(_StopAfter):
        def check(self, model, latents, aux):
            exits, outputs, _ = super().check(model, latents, aux)
            return exits, outputs, torch.zeros(5, 7)

    ids = torch.tensor([[5, 6, 7, 8]])
    options = dict(num_steps=8, max_new_tokens=3, do_sample=False)
    torch.manual_seed(0)
    plain = reference_model.generate(ids, exit_evaluator=OddValues(), **options)
    path = tmp_path / "odd.h5"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with loopscope.attach(reference_model, path):
            torch.manual_seed(0)
            hooked = reference_model.generate(ids, exit_evaluator=OddValues(), **options)
    assert torch.equal(plain, hooked)
    named = [w for w in caught if "exit evaluator" in str(w.message)]
    assert [str(w.message) for w in named] == [
        "loopscope: the exit evaluator's values (a tensor of shape (5, 7)) are neither one per batch row nor one "
        "per token; exit_value is not recorded for them"
    ]
    assert named[0].filename == __file__
    with loopscope.open(path) as capture:
        (run,) = capture.runs
        np.testing.assert_array_equal(run.num_steps, np.full(run.num_tokens, 3))
        assert run.signal_names() == []


_DROPPED_STUDY = """
import gc, sys, torch, loopscope
from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
register()
def study(path):  # the model and its capture are local: both are dropped when it returns, close() never called
    torch.manual_seed(0)
    model = RavenReferenceForCausalLM(tiny_config()).eval()
    loopscope.attach(model, path, buffer_mb=256)
    with torch.no_grad():
        for _ in range(6):
            model(torch.randint(3, 100, (4, 64)), num_steps=8)
study(sys.argv[1]); gc.collect()
"""


def _linked_runs(path) -> list[str]:
    with h5py.File(path, "r") as index:
        return sorted(index["runs"]) if "runs" in index else []


def test_a_capture_dropped_unclosed_with_its_model_keeps_and_links_every_run(tmp_path):
    """README: a script that ends without close() keeps every run whose forward returned, linked into the index,
    also when the capture and its model were collected first (both local to a function), and its writer thread ends
    (one dropped capture leaves no thread or buffers behind)."""
    path = tmp_path / "dropped.h5"
    code, _, err = run_script(_DROPPED_STUDY, path, timeout=240)
    assert code == 0, err
    assert len(_linked_runs(path)) == 24
    assert not [p for p in os.listdir(f"{path}.runs") if "partial" in p]
    with loopscope.open(path) as capture:
        assert len(capture.runs) == 24 and not capture.incomplete_runs

    in_process = tmp_path / "in_process.h5"
    writers = sum(t.name == "loopscope-writer" for t in threading.enumerate())  # other tests' captures, if any
    namespace: dict = {}
    exec(_DROPPED_STUDY.split("study(sys.argv[1])")[0], namespace)  # the same study() in this process
    namespace["study"](in_process)
    gc.collect()
    deadline = time.monotonic() + 60  # finished on loopscope's closing thread, not at exit
    while len(_linked_runs(in_process)) < 24 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_linked_runs(in_process)) == 24
    while sum(t.name == "loopscope-writer" for t in threading.enumerate()) > writers:
        assert time.monotonic() < deadline, "the dropped capture's writer thread never ended"
        time.sleep(0.1)


def test_a_relative_path_keeps_recording_after_the_working_folder_changes(reference_model, tmp_path, monkeypatch):
    """attach(model, "rel.h5") then os.chdir() (a notebook's %cd): the runs go beside the index attach() made,
    which links them; ``Capture.path`` is its absolute path."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    capture = loopscope.attach(reference_model, "rel.h5")
    assert capture.path == str(tmp_path / "a" / "rel.h5")
    monkeypatch.chdir(tmp_path / "b")
    with torch.no_grad():
        reference_model(torch.tensor([[5, 6, 7, 8]]), num_steps=2)
        reference_model(torch.tensor([[5, 6, 7]]), num_steps=3)
    capture.close()
    assert not os.listdir(tmp_path / "b")
    assert len(_linked_runs(tmp_path / "a" / "rel.h5")) == 2


def test_copying_or_pickling_an_attached_model_is_one_line_and_its_weights_still_save(reference_model, tmp_path):
    """copy.deepcopy(model) / torch.save(model) while attached: one LoopscopeError saying to close first (a copy
    would record into the original's capture); state_dict() and save_pretrained keep working; after close() the
    model copies as it did before."""
    import copy
    import io

    capture = loopscope.attach(reference_model, tmp_path / "copy.h5")
    for attempt in (lambda: copy.deepcopy(reference_model), lambda: torch.save(reference_model, io.BytesIO())):
        with pytest.raises(LoopscopeError, match=r"close the capture \(cap.close\(\)\) before copying") as caught:
            attempt()
        assert "\n" not in str(caught.value)
    weights = io.BytesIO()
    torch.save(reference_model.state_dict(), weights)
    reference_model.save_pretrained(tmp_path / "pretrained")
    assert (tmp_path / "pretrained" / "config.json").exists()
    with torch.no_grad():
        reference_model(torch.tensor([[5, 6, 7]]), num_steps=2)  # still recording
    capture.close()
    twin = copy.deepcopy(reference_model)
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), reference_model.state_dict().values()))
    with loopscope.open(tmp_path / "copy.h5") as stored:
        assert len(stored.runs) == 1


def test_a_hand_written_decoding_loop_stores_each_token_at_its_place(reference_model, prompt_ids, tmp_path):
    """model(token, past_key_values=cache) token by token: each forward is a run of its own, and its token sits at
    the cache's length, where the model puts it (it was stored at position 0, the run's own index)."""
    path, prompt = tmp_path / "c.h5", prompt_ids.shape[1]
    with loopscope.attach(reference_model, path), torch.no_grad():
        out = reference_model(prompt_ids, num_steps=3, use_cache=True)
        for _ in range(3):
            token = out.logits[:, -1:].argmax(-1)
            out = reference_model(token, num_steps=3, past_key_values=out.past_key_values, use_cache=True)
    with loopscope.open(path) as capture:
        assert [run.positions.tolist() for run in capture.runs] == [
            list(range(prompt)),
            [prompt],
            [prompt + 1],
            [prompt + 2],
        ]


def test_a_compiled_model_that_skips_the_hooks_is_named_not_recorded_empty_in_silence(new_reference_model, tmp_path):
    """torch.compile reuses graphs compiled without hooks (dynamo skips hook guards by default): after one compiled
    model of the class ran unhooked, a fresh compiled one runs its loop past loopscope's hooks. Its run holds no
    iterations; that is said once, with what to do (it was silent)."""
    torch._dynamo.reset()
    ids = torch.tensor([[1, 2, 3, 4]])
    try:
        with torch.no_grad():
            torch.compile(new_reference_model(), backend="eager")(ids, num_steps=3)
            model = torch.compile(new_reference_model(), backend="eager")
            with warnings.catch_warnings(record=True) as caught, loopscope.attach(model, tmp_path / "c.h5"):
                warnings.simplefilter("always")
                model(ids, num_steps=3)
                model(ids, num_steps=3)
    finally:
        torch._dynamo.reset()
    said = [m for m in _messages(caught) if "recorded no iteration of its loop" in m]
    with loopscope.open(tmp_path / "c.h5") as capture:
        try:
            recorded = capture.runs[0].num_steps.size > 0
        except LoopscopeError:  # "recorded no loop iterations"
            recorded = False
    if recorded:  # a torch whose compiled graphs honour hooks added later: nothing to say
        assert not said
    else:
        assert len(said) == 1 and "skip_nnmodule_hook_guards = False" in said[0]


def test_close_from_another_thread_mid_forward_names_the_cut_short_run(reference_model, prompt_ids, tmp_path):
    """close() while another thread's forward is in its loop: the forward's outputs are unchanged, its run is left
    incomplete, and that is what the warning says (it blamed a 'custom decoding loop' for orphan loop calls)."""
    with torch.no_grad():
        plain = reference_model(prompt_ids, num_steps=4, init_scale=0).logits
    paused, resume, result = threading.Event(), threading.Event(), {}

    def pause(module, args, output):
        if not paused.is_set():
            paused.set()
            assert resume.wait(30)

    def forward():
        with torch.no_grad():
            result["logits"] = reference_model(prompt_ids, num_steps=4, init_scale=0).logits

    cap = loopscope.attach(reference_model, tmp_path / "c.h5")
    pauser = reference_model.transformer.core_block[0].register_forward_hook(pause)
    worker = threading.Thread(target=forward)
    worker.start()
    try:
        assert paused.wait(30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cap.close()
    finally:
        resume.set()
        worker.join(30)
        pauser.remove()
    assert torch.equal(result["logits"], plain)
    said = _messages(caught)
    assert any("close() ended a forward that was still running" in m for m in said), said
    assert not any("outside the model's forward()" in m for m in said), said
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert capture.runs == [] and len(capture.incomplete_runs) == 1


def test_token_indices_past_a_calls_tokens_are_named_not_silent(reference_model, tmp_path):
    """tokens=[100] on a 3-token forward stores nothing and makes no run: said once (it was silent); a named
    selection that a call has none of (tokens="generated" on a forward) is the user's choice, not said."""
    for tokens, said in (([100], 1), ("generated", 0)):
        path = tmp_path / f"{said}.h5"
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            with loopscope.attach(reference_model, path, tokens=tokens):
                reference_model(torch.tensor([[1, 2, 3]]), num_steps=3)
                reference_model(torch.tensor([[1, 2, 3]]), num_steps=3)
        assert len([m for m in _messages(caught) if "kept none of a forward call's 3 tokens" in m]) == said
        with loopscope.open(path) as capture:
            assert capture.runs == []
