"""Dory (transformers-native, NVIDIA Nemotron-Labs Dory): a recurrent slice of ``model.layers`` looped
``n_recurrent_loops`` times, with both KV-cache modes. Tiny random configs, no downloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loopscope

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DoryConfig"):
    pytest.skip("dory needs transformers 5.x", allow_module_level=True)

from transformers import DoryConfig, DoryForCausalLM  # noqa: E402


def _dory(loops=3, cache_mode="per_loop"):
    config = DoryConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=5,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        n_input_layers=1,
        n_recurrent_layers=2,
        n_output_layers=2,
        n_recurrent_loops=loops,
        recurrent_kv_cache_mode=cache_mode,
        sliding_window=8,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    return DoryForCausalLM(config).eval()


class SliceRecorder:
    """Hand-written capture: s0 = the first recurrent layer's input at each forward's first loop, states = the last
    recurrent layer's outputs; the final L2 norm's calls are counted to show it is not the loop."""

    def __init__(self, model):
        first, last = model.model.layers[1], model.model.layers[2]
        self.forwards: list[dict] = []
        self.norm_calls = 0

        def on_model(module, args, kwargs):
            self.forwards.append({"s0": None, "states": []})

        def on_first(module, args, kwargs):
            if self.forwards[-1]["s0"] is None:
                self.forwards[-1]["s0"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def on_last(module, args, output):
            self.forwards[-1]["states"].append((output[0] if isinstance(output, tuple) else output).detach().clone())

        def on_norm(module, args, output):
            self.norm_calls += 1

        self.handles = [
            model.register_forward_pre_hook(on_model, with_kwargs=True),
            first.register_forward_pre_hook(on_first, with_kwargs=True),
            last.register_forward_hook(on_last),
            model.model.norm.register_forward_hook(on_norm),
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def trajectories(self, forward: int) -> torch.Tensor:
        f = self.forwards[forward]
        return torch.stack([f["s0"]] + f["states"], dim=2)  # [B, T, loops + 1, H]


@pytest.mark.parametrize("loops", [1, 4])
def test_forward_records_one_step_per_loop(tmp_path, loops):
    model = _dory(loops=loops)
    ids = torch.randint(0, 96, (2, 5))
    with torch.no_grad():
        plain = model(ids).logits
    recorder = SliceRecorder(model)
    with loopscope.attach(model, tmp_path / "d.h5") as capture:
        with torch.no_grad():
            hooked = model(ids).logits
    recorder.remove()
    assert torch.equal(plain, hooked)
    assert capture.adapter.family == "dory" and capture.adapter.loops[0].exit == "model.layers.2"
    assert recorder.norm_calls == loops + 2
    expected = recorder.trajectories(0)
    with loopscope.open(tmp_path / "d.h5") as f:
        assert len(f.runs) == 2
        for row, run in enumerate(f.runs):
            np.testing.assert_array_equal(run.num_steps, np.full(5, loops))
            np.testing.assert_array_equal(run.states(), expected[row].numpy())


@pytest.mark.parametrize("cache_mode", ["per_loop", "last_loop"])
def test_generate_aligns_tokens_in_both_cache_modes(tmp_path, cache_mode):
    model = _dory(loops=3, cache_mode=cache_mode)
    ids = torch.randint(0, 96, (1, 4))
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    recorder = SliceRecorder(model)
    with loopscope.attach(model, tmp_path / "g.h5"):
        hooked = model.generate(ids, max_new_tokens=4, do_sample=False)
    recorder.remove()
    assert torch.equal(plain, hooked)
    expected = torch.cat([recorder.trajectories(i)[0] for i in range(len(recorder.forwards))], dim=0)
    with loopscope.open(tmp_path / "g.h5") as f:
        (run,) = f.runs
        assert run.attrs["call"] == "generate" and run.num_tokens == 7
        np.testing.assert_array_equal(run.token_ids, hooked[0, :7].numpy())
        np.testing.assert_array_equal(run.forward_index, [0, 0, 0, 0, 1, 2, 3])
        np.testing.assert_array_equal(run.num_steps, np.full(7, 3))
        np.testing.assert_array_equal(run.states(), expected.numpy())


@pytest.mark.parametrize("selection", ["prompt", "generated"])
def test_chunked_prefill_tokens_are_prompt_tokens(tmp_path, selection):
    """generate(prefill_chunk_size=3) runs an 8-token prompt as three forwards: every one of them is the prompt,
    so tokens="prompt" keeps positions 0-7 and tokens="generated" only the decoded tokens fed back (8-10)."""
    ids = torch.tensor([[1, 5, 6, 7, 9, 10, 11, 12]])
    model = _dory()
    plain = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=3)
    path = tmp_path / "chunked.h5"
    with loopscope.attach(model, path, tokens=selection):
        hooked = model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=3)
    assert torch.equal(plain, hooked)
    with loopscope.open(path) as capture:
        (run,) = capture.runs
        want = range(8) if selection == "prompt" else range(8, 11)
        assert run.positions.tolist() == list(want)
        assert run.token_ids.tolist() == hooked[0, list(want)].tolist()


def test_a_static_cache_stores_the_mask_given_to_generate(tmp_path):
    """generate(cache_implementation="static") gives the forwards 4-D masks only: the left padding is stored as
    the 2-D mask given to generate() says (0), each decoded token as attended (1), as with a dynamic cache."""
    ids = torch.tensor([[0, 0, 0, 5, 6, 7], [8, 9, 10, 11, 12, 13]])
    mask = (ids != 0).long()
    stored = {}
    for cache in ("dynamic", "static"):
        model = _dory()
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **extra)
        path = tmp_path / f"{cache}.h5"
        with loopscope.attach(model, path):
            hooked = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, **extra)
        assert torch.equal(plain, hooked)
        with loopscope.open(path) as capture:
            stored[cache] = [run.attention_mask.tolist() for run in capture.runs]
    assert stored["static"] == stored["dynamic"] == [[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8]
