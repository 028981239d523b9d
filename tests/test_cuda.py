"""The CUDA path: rows gathered on the device, planes copied down on a side stream into pinned slabs.

These run only where a GPU is present (CI has none); they check the same promises as the CPU tests: every stored
state equals what plain hooks saw, and the logits are bit-identical with and without loopscope.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import loopscope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _expected(recorder, steps: int) -> np.ndarray:
    """[T, steps + 1, H] per forward, tokens concatenated, from the hand-written hooks (s0 and each iteration)."""
    forwards = len(recorder.states) // steps
    rows = [  # the adapter runs once per iteration: a forward's s0 is what it saw first
        torch.stack([recorder.s0[f * steps]] + recorder.states[f * steps : (f + 1) * steps], dim=2)
        for f in range(forwards)
    ]
    return torch.cat(rows, dim=1).float().cpu().numpy()  # [B, T, K, H]


@pytest.mark.parametrize("chunks", [None, (4, 3)])
def test_prefill_states_exact_and_logits_identical_on_cuda(reference_model, reference_recorder, tmp_path, chunks):
    model = reference_model.cuda()
    ids = torch.arange(40, device="cuda").remainder(model.config.vocab_size).view(2, 20)  # two runs: strided rows
    torch.manual_seed(0)  # s0 is drawn at random
    with torch.no_grad():
        plain = model(ids, num_steps=7).logits
    recorder = reference_recorder(model)
    with loopscope.attach(model, tmp_path / "c.h5", chunks=chunks):
        torch.manual_seed(0)
        with torch.no_grad():
            captured = model(ids, num_steps=7).logits
    recorder.remove()
    assert torch.equal(plain, captured)
    expected = _expected(recorder, 7)
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert len(capture.runs) == 2
        for b, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.states(), expected[b])


def test_generate_on_cuda_with_a_small_budget(reference_model, prompt_ids, reference_recorder, tmp_path):
    """Prefill and decoding through a budget small enough to make the hook wait for the writer."""
    model = reference_model.cuda()
    ids = prompt_ids.cuda()
    recorder = reference_recorder(model)
    with loopscope.attach(model, tmp_path / "c.h5", buffer_mb=0.05):
        torch.manual_seed(0)
        model.generate(ids, num_steps=5, max_new_tokens=12, do_sample=False)
    recorder.remove()
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert capture.meta["buffer_peak_bytes"] > 0
        np.testing.assert_array_equal(capture.runs[0].states(), _expected(recorder, 5)[0])


class _Scale(torch.nn.Module):
    def forward(self, x):
        return x * 0.5 + 1.0


class _ParameterFree(torch.nn.Module):
    """A looped module with no parameters at all: nothing tells attach() that the model lives on the GPU."""

    def __init__(self):
        super().__init__()
        self.block = _Scale()

    def forward(self, input_ids):
        x = torch.ones(*input_ids.shape, 32, device=input_ids.device) * input_ids[..., None]
        for _ in range(5):
            x = self.block(x)
        return x


def test_states_of_a_model_without_parameters_go_to_pinned_slabs(tmp_path):
    """Slabs are pinned by the state's device, not the model's parameters: a non-blocking copy into pageable memory
    would block the model's stream."""
    model = _ParameterFree()
    ids = torch.arange(12, device="cuda").view(1, 12)
    seen = []
    handle = model.block.register_forward_hook(lambda m, a, out: seen.append(out.detach().cpu()))
    cap = loopscope.attach(model, tmp_path / "c.h5", loop="block")
    with torch.no_grad():
        model(input_ids=ids)
    cap.flush()
    slabs = [slab for free in cap.pool._free.values() for slab in free]
    cap.close()
    handle.remove()
    assert slabs and all(slab.is_pinned() for slab in slabs)
    with loopscope.open(tmp_path / "c.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].states()[:, 1:], torch.stack(seen, dim=2)[0].numpy())


def test_a_captured_forward_never_waits_for_the_device(reference_model, tokenizer, prompt_ids, tmp_path):
    """No host synchronisation in the hooks: the states, and the forward's token ids, mask and positions too, go
    down on the side stream. A second of GPU work is queued ahead of each forward; a hook that waited for the
    device would hold the forward's host time to that second."""
    model = reference_model.cuda()
    ids = prompt_ids.cuda().repeat(2, 1)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0

    def host_seconds_of_a_forward() -> float:
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of device time on the model's stream
        t = time.perf_counter()
        with torch.no_grad():
            model(ids, attention_mask=mask, num_steps=4)
        elapsed = time.perf_counter() - t
        torch.cuda.synchronize()
        return elapsed

    host_seconds_of_a_forward()  # first-call costs out of the way
    if host_seconds_of_a_forward() > 0.5:
        pytest.skip("the model's own forward waits for the device here")
    cap = loopscope.attach(model, tmp_path / "c.h5", tokenizer=tokenizer, tokens=slice(1, None))
    host_seconds_of_a_forward()  # pinned slabs and scratch allocated once
    waited = host_seconds_of_a_forward()
    cap.close()
    assert waited < 0.5
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert len(capture.runs) == 4
        for b, run in enumerate(capture.runs[2:]):
            np.testing.assert_array_equal(run.token_ids, ids[b, 1:].cpu().numpy())
            np.testing.assert_array_equal(run.attention_mask, mask[b, 1:].cpu().numpy())
            np.testing.assert_array_equal(run.positions, np.arange(1, ids.shape[1]))
            assert run.tokens == [tokenizer.decode([int(i)]) for i in ids[b, 1:]]


@pytest.mark.parametrize("tokens, hidden", [(64, 256), (2048, 4096)])
def test_states_changed_in_place_after_the_hook_are_stored_as_the_hook_saw_them(
    tmp_path, state_changed_in_place, tokens, hidden
):
    """The device gather runs on the model's stream, before the model's later in-place writes; a side-stream read
    could land after them. 64 x 256 floats go through a slab's device plane; 2048 x 4096 (32 MiB a step, over the
    16 MiB slab limit) go down a step at a time from a copy (``_record_split``)."""
    model = state_changed_in_place(hidden=hidden)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="cuda")
    with loopscope.attach(model, tmp_path / "c.h5", loop="block") as cap:
        split = tokens * hidden * 4 > cap.pool.max_slab_bytes(pinned=True)
        assert split == (tokens == 2048)
        with torch.no_grad():
            model(input_ids=ids)
    with loopscope.open(tmp_path / "c.h5") as capture:
        states = capture.runs[0].states()  # [T, 7, H]
    np.testing.assert_array_equal(states[:, :, 0], np.broadcast_to(model.expected(), states.shape[:2]))
    assert (states == states[:, :, :1]).all()


def test_a_cpu_s0_before_cuda_iterations_is_stored(tmp_path, state_changed_in_place):
    """s0 made on the CPU (an offloaded embedding) and the iterations on the GPU fill the same planes of a slab:
    the CPU row goes up to the device plane, not into the slab the device plane is later copied over."""

    class DoubleOnCuda(torch.nn.Module):
        def forward(self, x):
            return x.cuda() * 2.0

    model = state_changed_in_place(hidden=256)  # its first state, s0, is made on the CPU
    model.block = DoubleOnCuda()
    ids = torch.zeros(1, 64, dtype=torch.long)
    with loopscope.attach(model, tmp_path / "c.h5", loop="block", chunks=(64, 4)):
        with torch.no_grad():
            model(input_ids=ids)
    with loopscope.open(tmp_path / "c.h5") as capture:
        states = capture.runs[0].states()
    np.testing.assert_array_equal(states[:, :, 0], np.broadcast_to(model.expected(), states.shape[:2]))


def test_pinned_memory_is_counted_as_held_and_handed_back_at_close(reference_model, tmp_path):
    """PyTorch pins memory in power-of-two blocks and caches freed ones: the pool's count covers what PyTorch
    holds for its slabs, within the budget, and closing hands the idle blocks back."""
    from loopscope.storage.write.buffers import empty_pinned_cache

    def pinned_bytes() -> int:
        return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)

    model = reference_model.cuda()
    ids = torch.arange(23, device="cuda").view(1, 23)  # slabs of sizes that are not powers of two
    torch.cuda.synchronize()
    empty_pinned_cache()
    before = pinned_bytes()
    cap = loopscope.attach(model, tmp_path / "c.h5")
    with torch.no_grad():
        model(ids, num_steps=5)
        model(ids[:, :17], num_steps=5)  # another shape
    cap.flush()
    held = pinned_bytes() - before
    assert 0 < held <= cap.pool.stats.peak_bytes + (1 << 20)  # the ids, masks and positions' scratch aside
    assert cap.pool.stats.peak_bytes <= cap.pool.budget_bytes
    cap.close()
    assert pinned_bytes() - before <= 1 << 20


def test_forwards_in_and_out_of_inference_mode_on_cuda(reference_model, reference_recorder, tmp_path):
    """Pinned slabs and scratch made during an inference_mode forward are reused by a no_grad one."""
    model = reference_model.cuda()
    ids = torch.arange(20, device="cuda").view(1, 20)
    recorder = reference_recorder(model)
    with loopscope.attach(model, tmp_path / "c.h5") as cap:
        for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
            with mode():
                model(ids, num_steps=3)
            cap.flush()
    recorder.remove()
    expected = _expected(recorder, 3)[0]  # the three forwards' tokens one after another
    with loopscope.open(tmp_path / "c.h5") as capture:
        assert len(capture.runs) == 3
        for f, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.states(), expected[20 * f : 20 * (f + 1)])
