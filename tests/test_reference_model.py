"""The Huginn-shaped reference model: call pattern, s0, KV cache, generate paths, save/load, tokenizer."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

from loopscope.models import demo_tokenizer
from loopscope.models.demo_tokenizer import build_tokenizer
from loopscope.models.huginn_reference import (
    RavenReferenceConfig,
    RavenReferenceForCausalLM,
    RecurrentKVCache,
    register,
    tiny_config,
)

PROMPT = "Looped models think by iterating."


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def model():
    register()
    torch.manual_seed(0)
    return RavenReferenceForCausalLM(tiny_config()).eval()


@pytest.fixture
def ids(tok):
    return tok(PROMPT, return_tensors="pt").input_ids


class Calls:
    """Counts calls of a module and records the shape of what it returned."""

    def __init__(self, module):
        self.shapes = []
        self.handle = module.register_forward_hook(lambda m, a, out: self.shapes.append(tuple(out.shape)))

    def __len__(self):
        return len(self.shapes)

    def remove(self):
        self.handle.remove()


class FirstInputs:
    """Records the first positional input of every call of a module."""

    def __init__(self, module):
        self.inputs = []
        self.handle = module.register_forward_pre_hook(lambda m, args: self.inputs.append(args[0].detach().clone()))

    def remove(self):
        self.handle.remove()


def _never_called(*module_lists):
    hits = []
    handles = [m.register_forward_pre_hook(lambda *a: hits.append(1)) for m in module_lists]
    return hits, handles


@pytest.mark.parametrize(
    ("num_steps", "expected"),
    [
        (3, 3),
        (torch.tensor(4), 4),
        (torch.tensor([6]), 6),
        ((2, 3), 5),
        (torch.tensor([1, 2]), 3),
        ([0, 2], 2),
        (None, "mean"),
    ],
    ids=["int", "tensor0d", "tensor1", "pair", "tensor-pair", "list-pair", "none"],
)
def test_core_block_exit_called_once_per_iteration(model, ids, num_steps, expected):
    expected = model.config.mean_recurrence if expected == "mean" else expected
    t = model.transformer
    exit_calls, first_core = Calls(t.core_block[-1]), Calls(t.core_block[0])
    adapter, ln_f = Calls(t.adapter), Calls(t.ln_f)
    prelude, coda = Calls(t.prelude[0]), Calls(t.coda[0])
    hits, handles = _never_called(t.core_block, t.prelude, t.coda)
    with torch.no_grad():
        out = model(ids, num_steps=num_steps)
    for c in (exit_calls, first_core, adapter, ln_f, prelude, coda):
        c.remove()
    for h in handles:
        h.remove()
    assert len(exit_calls) == len(first_core) == len(adapter) == expected
    assert len(prelude) == len(coda) == 1
    assert len(ln_f) == 2  # the latent readout, then after the coda
    assert hits == []  # the ModuleLists themselves are never called
    assert out.logits.dtype == torch.float32
    assert out.logits.shape == (1, ids.shape[1], model.config.padded_vocab_size)
    assert out.latent_states.shape == (1, ids.shape[1], model.config.n_embd)


def test_pair_form_backpropagates_only_through_grad_steps(model, ids):
    model(ids, num_steps=3).logits.sum().backward()
    assert model.transformer.adapter.weight.grad is None  # a plain count runs without autograd, as in Huginn
    model(ids, num_steps=(2, 1)).logits.sum().backward()
    assert model.transformer.adapter.weight.grad is not None


def test_adapter_sees_s0_then_embeddings(model, ids):
    E = model.config.n_embd
    s0 = torch.randn(1, ids.shape[1], E)
    rec = FirstInputs(model.transformer.adapter)
    with torch.no_grad():
        model(ids, num_steps=2, input_states=s0)
    rec.remove()
    assert rec.inputs[0].shape == (1, ids.shape[1], 2 * E)
    torch.testing.assert_close(rec.inputs[0][..., :E], s0, rtol=0, atol=0)
    # the embedding half is the same at every iteration
    torch.testing.assert_close(rec.inputs[0][..., E:], rec.inputs[1][..., E:], rtol=0, atol=0)


def test_random_s0_distribution(model):
    E, iv = model.config.n_embd, model.config.init_values
    batch = torch.randint(0, model.config.vocab_size, (2, 40))
    rec = FirstInputs(model.transformer.adapter)
    with torch.no_grad():
        torch.manual_seed(123)
        model(batch, num_steps=1)
        model(batch, num_steps=1, init_scale=0.5)
        model(batch, num_steps=1, init_scale=0.0)
    rec.remove()
    s0, s0_half, s0_zero = (x[..., :E] for x in rec.inputs)
    std = iv["std"] * iv["embed_scale"]  # Huginn scales s0 like the token embeddings
    truncated = std * 0.9866  # std of a normal truncated at +-3 sigma
    assert s0.std().item() == pytest.approx(truncated, rel=0.05)
    assert s0.abs().max().item() <= 3 * std + 1e-6
    assert s0_half.std().item() == pytest.approx(truncated / 2, rel=0.05)
    assert torch.count_nonzero(s0_zero) == 0
    # s0 is exactly initialize_state() under the same seed: forward draws nothing else before the loop
    torch.manual_seed(123)
    torch.testing.assert_close(s0, model.initialize_state(torch.empty(2, 40, E)), rtol=0, atol=0)


def test_sane_through_many_iterations(model, ids):
    exit_calls = FirstInputs(model.transformer.core_block[-1].norm_4)
    with torch.no_grad():
        out = model(ids, num_steps=96)
    exit_calls.remove()
    assert torch.isfinite(out.logits).all()
    assert out.logits.abs().max() < 50
    rms = torch.stack([x.pow(2).mean().sqrt() for x in exit_calls.inputs])
    assert torch.isfinite(rms).all() and rms.max() < 10


def _greedy_by_recomputation(model, ids, steps, new_tokens):
    seq = ids
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(seq, num_steps=steps, init_scale=0.0).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=-1)
    return seq


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_cached_generate_matches_recomputation(ids, kv_heads):
    torch.manual_seed(1)
    model = RavenReferenceForCausalLM(tiny_config(num_key_value_heads=kv_heads)).eval()
    expected = _greedy_by_recomputation(model, ids, steps=4, new_tokens=8)
    cached = model.generate(ids, max_new_tokens=8, do_sample=False, num_steps=4, init_scale=0.0)
    uncached = model.generate(ids, max_new_tokens=8, do_sample=False, num_steps=4, init_scale=0.0, use_cache=False)
    assert torch.equal(cached, expected)
    assert torch.equal(uncached, expected)


def test_generate_passes_num_steps_and_uses_cache(model, ids):
    k, new_tokens, S, E = 3, 5, ids.shape[1], model.config.n_embd
    exit_calls = Calls(model.transformer.core_block[-1])
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, num_steps=k, return_dict_in_generate=True)
    exit_calls.remove()
    assert out.sequences.shape == (1, S + new_tokens)
    assert len(exit_calls) == k * new_tokens  # one prefill + (new_tokens - 1) decode forwards
    assert exit_calls.shapes[:k] == [(1, S, E)] * k
    assert exit_calls.shapes[k:] == [(1, 1, E)] * (k * (new_tokens - 1))
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    assert isinstance(cache, RecurrentKVCache)
    cfg = model.config
    # one entry per block index: prelude, every iteration's core blocks, coda
    assert cache.num_entries == cfg.n_layers_in_prelude + k * cfg.n_layers_in_recurrent_block + cfg.n_layers_in_coda
    assert sorted(cache.key_cache) == [-1, 0, 1, 2, 3, 4, 5, 6]
    assert cache.get_seq_length() == S + new_tokens - 1


def test_forward_swaps_an_empty_hf_cache(model, ids):
    with torch.no_grad():
        out = model(ids, num_steps=2, past_key_values=DynamicCache(), use_cache=True, init_scale=0.0)
    assert isinstance(out.past_key_values, RecurrentKVCache)
    assert out.past_key_values.get_seq_length() == ids.shape[1]


def test_continuous_compute_warm_starts_from_previous_latent(model, ids):
    k, new_tokens, S, E = 3, 4, ids.shape[1], model.config.n_embd
    adapter_in, exits = FirstInputs(model.transformer.adapter), Calls(model.transformer.core_block[-1])
    exit_states = []
    handle = model.transformer.core_block[-1].register_forward_hook(lambda m, a, o: exit_states.append(o.detach()))
    torch.manual_seed(0)
    seq = model.generate(ids, continuous_compute=True, max_new_tokens=new_tokens, num_steps=k, do_sample=False)
    adapter_in.remove(), exits.remove(), handle.remove()
    assert seq.shape == (1, S + new_tokens)
    assert len(exits) == k * new_tokens
    for t in range(1, new_tokens):
        s0 = adapter_in.inputs[t * k][..., :E]
        assert s0.shape == (1, 1, E)
        with torch.no_grad():
            previous_latent = model.transformer.ln_f(exit_states[t * k - 1])[:, -1:]
        torch.testing.assert_close(s0, previous_latent, rtol=0, atol=0)
    # continuous_compute=False is an ordinary HF generate
    plain = model.generate(ids, continuous_compute=False, max_new_tokens=2, num_steps=2, do_sample=False)
    assert plain.shape == (1, S + 2)


def test_save_load_round_trip(model, ids, tmp_path):
    register()
    register()  # idempotent
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), RavenReferenceConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RavenReferenceForCausalLM
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied
    assert loaded.config.init_values == model.config.init_values
    assert loaded.config.n_layers_in_recurrent_block == model.config.n_layers_in_recurrent_block
    with torch.no_grad():
        torch.manual_seed(5)
        a = model(ids, num_steps=4).logits
        torch.manual_seed(5)
        b = loaded(ids, num_steps=4).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_defaults_are_huginn_0125():
    cfg = RavenReferenceConfig()
    assert (cfg.n_embd, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (5280, 55, 55, 96)
    assert (cfg.n_layers_in_prelude, cfg.n_layers_in_recurrent_block, cfg.n_layers_in_coda) == (2, 4, 2)
    assert (cfg.mean_recurrence, cfg.mean_backprop_depth, cfg.vocab_size, cfg.block_size) == (32, 8, 65536, 4096)
    assert cfg.num_hidden_layers == 8 and cfg.hidden_size == 5280 and cfg.tie_word_embeddings


def test_tokenizer(tok):
    for text in (PROMPT, "naïve café — ünïcode ✓ 42\n\ttabs"):
        assert tok.decode(tok(text).input_ids) == text
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert len(tok) <= tiny_config().vocab_size
    demo_tokenizer._trained_tokenizer_json.cache_clear()
    start = time.perf_counter()
    again = build_tokenizer()
    assert time.perf_counter() - start < 1.0
    assert again.get_vocab() == tok.get_vocab()  # training is deterministic
