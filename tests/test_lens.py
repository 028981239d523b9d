"""The readout lens against plain torch: the model's own readout modules applied to the stored states, measured with
``torch.distributions`` (an implementation independent of loopscope's), on real captures of the reference model,
HRM-Text, the Ouro-style model and the other families; the coda lens against the model's own logits; a sharded
checkpoint read for the head alone; and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch.distributions import Categorical, kl_divergence

import loopscope
from loopscope.analysis.readout_lens import lens
from loopscope.errors import LoopscopeError
from loopscope.models.ouro_reference import OuroReferenceForCausalLM
from loopscope.models.ouro_reference import tiny_config as ouro_config

RTOL = 1e-5


def _plain(states: np.ndarray, last: np.ndarray, readout, top_k: int = 5) -> dict[str, np.ndarray]:
    """Every lens measure, token by token and step by step, from ``readout`` applied to all states at once."""
    with torch.no_grad():
        logits = readout(torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))).double()
    n_tokens, n_slots = logits.shape[:2]
    out = {name: np.full((n_tokens, n_slots), np.nan) for name in ("entropy", "kl_final", "kl_previous", "final_prob")}
    out["top_ids"] = np.full((n_tokens, n_slots, top_k), -1)
    out["top_probs"] = np.full((n_tokens, n_slots, top_k), np.nan)
    out["final_rank"] = np.full((n_tokens, n_slots), -1)
    for t in range(n_tokens):
        final = Categorical(logits=logits[t, last[t]])
        target = int(final.probs.argmax())
        for k in range(last[t] + 1):
            here = Categorical(logits=logits[t, k])
            probs = here.probs
            out["entropy"][t, k] = float(here.entropy())
            out["kl_final"][t, k] = float(kl_divergence(here, final))
            if k:
                out["kl_previous"][t, k] = float(kl_divergence(here, Categorical(logits=logits[t, k - 1])))
            top = torch.topk(probs, top_k)
            out["top_ids"][t, k], out["top_probs"][t, k] = top.indices.numpy(), top.values.numpy()
            out["final_rank"][t, k] = int((probs > probs[target]).sum())
            out["final_prob"][t, k] = float(probs[target])
    return out


def _assert_same(result, want: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(result.top_ids, want["top_ids"])
    np.testing.assert_array_equal(result.final_rank, want["final_rank"])
    for name in ("top_probs", "entropy", "kl_final", "kl_previous", "final_prob"):
        np.testing.assert_allclose(getattr(result, name), want[name], rtol=RTOL, atol=1e-12, err_msg=name)


def _settling(top1: np.ndarray, last: np.ndarray) -> np.ndarray:
    out = []
    for t, end in enumerate(last):
        k = end
        while k > 0 and top1[t, k - 1] == top1[t, end]:
            k -= 1
        out.append(k)
    return np.asarray(out)


def test_logit_lens_of_the_reference_model_equals_plain_torch(reference_model, tokenizer, prompt_ids, tmp_path):
    """An adaptive-exit generate(): tokens of different depths, each measured against its own last step."""
    path = tmp_path / "a.h5"
    with loopscope.attach(reference_model, path, tokenizer=tokenizer):
        torch.manual_seed(0)
        reference_model.generate(
            prompt_ids, max_new_tokens=6, num_steps=16, criterion="kl", exit_threshold=1e-4, do_sample=False
        )
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        last = run.steps_of(None)
        assert len(set(last.tolist())) > 1
        result = lens(run, reference_model, tokenizer=tokenizer)
        model = reference_model
        want = _plain(run.states(), last, lambda x: model.lm_head(model.transformer.ln_f(x)))
        tokens = run.tokens
    _assert_same(result, want)
    np.testing.assert_array_equal(result.settling, _settling(result.top1, last))
    assert result.tokens == tokens and result.top1_text[0, 0] == tokenizer.decode([int(result.top1[0, 0])])
    assert np.all(result.kl_final[np.arange(len(last)), last] == 0)


def test_logit_lens_streams_in_blocks_and_keeps_the_results(reference_model, prompt_ids, tmp_path):
    path = tmp_path / "b.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(prompt_ids, num_steps=6)
    with loopscope.open(path) as capture:
        whole = lens(capture.runs[0], reference_model)
        blocks = lens(capture.runs[0], reference_model, block_tokens=2)
    for name in ("top_ids", "entropy", "kl_final", "kl_previous", "final_rank"):
        np.testing.assert_allclose(getattr(blocks, name), getattr(whole, name), rtol=1e-12, err_msg=name)


def test_coda_lens_of_a_prefill_run_is_the_models_own_logits(reference_model, prompt_ids, tmp_path):
    path = tmp_path / "c.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        torch.manual_seed(0)
        logits = reference_model(prompt_ids, num_steps=8).logits[0].double()
    with loopscope.open(path) as capture:
        result = lens(capture.runs[0], reference_model, "coda")
    probs = torch.softmax(logits, -1)
    top = torch.topk(probs, 5)
    np.testing.assert_array_equal(result.top_ids[:, -1], top.indices.numpy())
    np.testing.assert_allclose(result.top_probs[:, -1], top.values.numpy(), rtol=RTOL)
    np.testing.assert_allclose(result.entropy[:, -1], Categorical(probs=probs).entropy().numpy(), rtol=RTOL)
    assert result.kind == "coda" and np.all(result.kl_final[:, -1] == 0)


def test_coda_lens_refuses_a_run_that_stored_some_tokens_only(reference_model, prompt_ids, tmp_path):
    """Stored tokens would attend to each other alone: wrong predictions, so one line instead. A prompt-only run
    (every token from position 0) and a left-padded row (pads aside, positions 0, 1, ...) stay measurable."""
    with loopscope.attach(reference_model, tmp_path / "s.h5", tokens=[1, 3, 5]), torch.no_grad():
        reference_model(prompt_ids, num_steps=4)
    with loopscope.attach(reference_model, tmp_path / "g.h5", tokens="generated"):
        reference_model.generate(prompt_ids, max_new_tokens=3, num_steps=4, do_sample=False)
    with loopscope.attach(reference_model, tmp_path / "p.h5", tokens="prompt"):
        reference_model.generate(prompt_ids, max_new_tokens=3, num_steps=4, do_sample=False)
    ids = torch.cat([prompt_ids, torch.cat([torch.zeros_like(prompt_ids[:, :2]), prompt_ids[:, 2:]], 1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with loopscope.attach(reference_model, tmp_path / "pad.h5"), torch.no_grad():
        reference_model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), num_steps=4)
    for name, chosen in (("s.h5", "token indices 1,3,5"), ("g.h5", "generated")):
        with loopscope.open(tmp_path / name) as capture:
            with pytest.raises(LoopscopeError, match=rf"needs every token .* \(token selection: {chosen}\): use "):
                lens(capture.runs[0], reference_model, "coda")
    with loopscope.open(tmp_path / "p.h5") as capture:
        assert lens(capture.runs[0], reference_model, "coda").num_tokens == prompt_ids.shape[1]
    with loopscope.open(tmp_path / "pad.h5") as capture:
        assert [lens(run, reference_model, "coda").num_tokens for run in capture.runs] == [ids.shape[1]] * 2


def test_lens_labels_each_tokens_own_iterations_with_a_stride_and_adaptive_exit(reference_model, prompt_ids, tmp_path):
    """With step_stride=4 a token that exits at iteration 6 holds it in slot 2, where a deeper token holds 8: the
    CSV and settling iterations are each token's own, and the figures' axis says stored step."""
    import csv

    from loopscope.analysis import lens_figures

    with loopscope.attach(reference_model, tmp_path / "a.h5", step_stride=4):
        torch.manual_seed(0)
        reference_model.generate(
            prompt_ids, max_new_tokens=6, num_steps=16, criterion="kl", exit_threshold=1e-3, do_sample=False
        )
    with loopscope.open(tmp_path / "a.h5") as capture:
        run = capture.runs[0]
        truth = run.step_iterations()
        assert len({tuple(row[row >= 0]) for row in truth}) > 1  # tokens hold different iterations in one slot
        result = lens(run, reference_model)
    np.testing.assert_array_equal(result.settling_iteration, truth[np.arange(len(truth)), result.settling])
    result.to_csv(tmp_path / "lens.csv")
    with open(tmp_path / "lens.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["iteration"]) for r in rows] == [int(truth[int(r["token_index"]), int(r["step"])]) for r in rows]
    assert result.shared_steps is None
    for fig in lens_figures.kl_figures(result):
        assert fig.axes[0].get_xlabel().startswith("Stored step")


def test_hrm_text_lens_reads_the_h_stream_and_says_the_l_stream_has_none(tmp_path, new_hrm_text_model):
    model = new_hrm_text_model(h_cycles=3, l_cycles=2)
    ids = torch.randint(0, 100, (1, 9))
    with loopscope.attach(model, tmp_path / "h.h5"), torch.no_grad():
        logits = model(ids).logits[0].double()
    with loopscope.open(tmp_path / "h.h5") as capture:
        run = capture.runs[0]
        result = lens(run, model, loop="H")
        want = _plain(run.states(loop="H"), run.steps_of("H"), model.lm_head)
        with pytest.raises(LoopscopeError, match="L stream only feeds the H stream"):
            lens(run, model, loop="L")
        model.save_pretrained(tmp_path / "ckpt")  # from a checkpoint: the same reason, and no advice to load it
        with pytest.raises(LoopscopeError, match=r"loop 'L' has no logit lens \(.*L stream.*\); read another loop$"):
            lens(run, tmp_path / "ckpt", loop="L")
    _assert_same(result, want)
    np.testing.assert_allclose(result.top_probs[:, -1, 0], torch.softmax(logits, -1).max(-1).values, rtol=RTOL)


def test_ouro_lens_is_the_models_own_per_pass_readout(tmp_path):
    torch.manual_seed(0)
    model = OuroReferenceForCausalLM(ouro_config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    with loopscope.attach(model, tmp_path / "o.h5"), torch.no_grad():
        model(ids)
    with loopscope.open(tmp_path / "o.h5") as capture:
        run = capture.runs[0]
        result = lens(run, model)
        want = _plain(run.states(), run.steps_of(None), model.lm_head)
        with pytest.raises(LoopscopeError, match="needs a model with a coda"):
            lens(run, model, "coda")
    _assert_same(result, want)


@pytest.mark.parametrize("family", ["albert", "dory", "inkling2_loop"])
def test_every_family_with_a_head_has_a_logit_lens(family, tmp_path):
    model, ids, readout = _family_model(family)
    with loopscope.attach(model, tmp_path / "f.h5"), torch.no_grad():
        model(ids)
    with loopscope.open(tmp_path / "f.h5") as capture:
        run = capture.runs[0]
        result = lens(run, model)
        want = _plain(run.states(), run.steps_of(None), readout)
    _assert_same(result, want)


def _family_model(family: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "albert":
        config = transformers.AlbertConfig(
            vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=4, num_hidden_groups=1,
            num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
        )  # fmt: skip
        model = transformers.AlbertForMaskedLM(config).eval()
        return model, torch.randint(0, 64, (1, 8)), model.predictions
    if family == "dory":
        if not hasattr(transformers, "DoryConfig"):
            pytest.skip("dory needs transformers 5.x")
        config = transformers.DoryConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, n_input_layers=1, n_recurrent_layers=2, n_output_layers=2,
            n_recurrent_loops=3, sliding_window=8, eos_token_id=None,
        )  # fmt: skip
        model = transformers.DoryForCausalLM(config).eval()
        return model, torch.randint(0, 96, (1, 8)), lambda x: model.lm_head(model.model.norm(x))
    inkling = pytest.importorskip("transformers.models.inkling2_loop.modeling_inkling2_loop")
    configs = pytest.importorskip("transformers.models.inkling2_loop.configuration_inkling2_loop")
    config = configs.Inkling2LoopTextConfig(
        vocab_size=128, unpadded_vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, swa_num_attention_heads=2, swa_num_key_value_heads=1, swa_head_dim=16,
        sliding_window_size=16, d_rel=4, rel_extent=16, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=2, loop_layer_index_start=2, loop_layer_index_end=4,
        loop_num_passes=3,
    )  # fmt: skip
    model = inkling.Inkling2LoopForCausalLM(config).eval()
    return model, torch.randint(0, 128, (1, 8)), lambda x: model.logit_softcap(model.lm_head(model.model.norm(x)))


def test_lens_from_a_sharded_checkpoint_reads_only_the_head(reference_model, prompt_ids, tmp_path, monkeypatch):
    """A checkpoint in shards with an index: the lens reads one matrix (the head) from one shard, and the norm's
    vector to check it, and agrees with the loaded model's lens."""
    path = tmp_path / "s.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(prompt_ids, num_steps=6)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    state = {name: t.detach().clone().contiguous() for name, t in reference_model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"].clone()  # an untied copy, as a sharded checkpoint stores it
    names = sorted(state)
    shards = {f"model-{i:05d}-of-00004.safetensors": names[i::4] for i in range(4)}
    weight_map = {}
    for shard, members in shards.items():
        save_file({n: state[n] for n in members}, str(folder / shard))
        weight_map.update({n: shard for n in members})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(reference_model.config.to_json_string())
    total = sum(t.numel() * t.element_size() for t in state.values())

    import safetensors

    read: list[tuple[str, int]] = []
    real_open = safetensors.safe_open

    class Counting:
        def __init__(self, file, framework, **kwargs):
            self.handle = real_open(file, framework=framework, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            read.append((name, tensor.numel() * tensor.element_size()))
            return tensor

    monkeypatch.setattr(safetensors, "safe_open", Counting)
    with loopscope.open(path) as capture:
        from_dir = lens(capture.runs[0], folder)
        from_model = lens(capture.runs[0], reference_model)
    assert [name for name, _ in read] == ["lm_head.weight", "transformer.ln_f.weight"]  # the norm: to check it
    assert sum(size for _, size in read) * 4 < total  # the head (and one vector): a fraction of the checkpoint
    np.testing.assert_array_equal(from_dir.top_ids, from_model.top_ids)
    np.testing.assert_allclose(from_dir.top_probs, from_model.top_probs, rtol=1e-4)


def test_bad_models_and_directories_are_one_line_errors(reference_model, new_reference_model, prompt_ids, tmp_path):
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, tiny_config

    path = tmp_path / "e.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(prompt_ids, num_steps=4)
    wider = RavenReferenceForCausalLM(tiny_config(n_embd=96, vocab_size=reference_model.config.vocab_size)).eval()
    smaller_vocab = RavenReferenceForCausalLM(tiny_config(vocab_size=8, padded_vocab_size=8)).eval()
    ouro = OuroReferenceForCausalLM(ouro_config()).eval()
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(reference_model.config.to_json_string())
    save_file({"other.weight": torch.zeros(2, 2)}, str(no_weights / "model.safetensors"))
    from transformers import GPT2Config, GPT2LMHeadModel

    as_wide = tmp_path / "gpt2"  # another model of the same width and vocabulary: its head reads, wrongly
    width, vocab = reference_model.config.n_embd, reference_model.config.vocab_size
    GPT2LMHeadModel(GPT2Config(n_embd=width, vocab_size=vocab, n_layer=1, n_head=2)).save_pretrained(as_wide)
    no_type = tmp_path / "no_type"
    no_type.mkdir()
    (no_type / "config.json").write_text("{}")
    cases = [
        (lambda run: lens(run, as_wide), "has model_type='gpt2', the capture's model 'loopscope_raven'"),
        (lambda run: lens(run, no_type), "has model_type=None"),
        (lambda run: lens(run, wider), "64-wide"),
        (lambda run: lens(run, smaller_vocab), "vocabulary"),
        (lambda run: lens(run, ouro), "huginn-raven model"),
        (lambda run: lens(run, tmp_path / "missing"), "does not exist"),
        (lambda run: lens(run, empty), "no config.json"),
        (lambda run: lens(run, no_weights), "no tensor lm_head.weight"),
        (lambda run: lens(run, reference_model, "tuned"), "kind='tuned'"),
        (lambda run: lens(run, reference_model, top_k=0), "top_k"),
        (lambda run: lens(run, reference_model, loop="L"), "no loop 'L'"),
    ]
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        for call, pattern in cases:
            with pytest.raises(LoopscopeError, match=pattern) as caught:
                call(run)
            assert "\n" not in str(caught.value)


def test_a_checkpoint_with_another_readout_norm_is_refused_and_dtype_rounding_is_not(
    new_reference_model, prompt_ids, tmp_path
):
    """Same architecture, sizes and head shape, other weights: the checkpoint's ln_f differs from the stored one.
    A model captured in bfloat16 from a float32 checkpoint still reads that checkpoint."""
    trained = new_reference_model()
    with torch.no_grad():
        trained.transformer.ln_f.weight.uniform_(0.5, 1.5)  # as training leaves it (a fresh norm is all ones)
    checkpoint, other = tmp_path / "ckpt", tmp_path / "other"
    trained.save_pretrained(checkpoint)
    saved_norm = trained.transformer.ln_f.weight.detach().clone().numpy()
    another = new_reference_model(seed=1)
    with torch.no_grad():
        another.transformer.ln_f.weight.copy_(trained.transformer.ln_f.weight * 1.05)  # another step's norm
    another.save_pretrained(other)
    path = tmp_path / "bf16.h5"
    in_bf16 = trained.to(torch.bfloat16)
    with loopscope.attach(in_bf16, path), torch.no_grad():
        in_bf16(prompt_ids, num_steps=4)
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        assert not np.array_equal(capture.readout.weight, saved_norm)  # rounded to bfloat16: not equal, yet the same
        assert lens(run, checkpoint).top_ids.shape[0] == run.num_tokens
        with pytest.raises(LoopscopeError, match=r"another transformer\.ln_f\.weight .* pass that one$"):
            lens(run, other)


def test_lens_of_a_merged_run_and_through_dask_equals_the_lens_of_its_source(reference_model, prompt_ids, tmp_path):
    """The same numbers from the source run, the run in a merged capture (virtual datasets), and Dask tasks reading
    the head from a checkpoint directory."""
    pytest.importorskip("dask")
    from loopscope.analysis import distributed_lens
    from loopscope.storage.merge import merge

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    for path, steps in ((a, 5), (b, 7)):
        with loopscope.attach(reference_model, path), torch.no_grad():
            torch.manual_seed(0)
            reference_model(prompt_ids, num_steps=steps)
    merge(tmp_path / "merged.h5", [a, b])
    folder = tmp_path / "ckpt"
    reference_model.save_pretrained(folder)
    with loopscope.open(b) as source:
        want = lens(source.runs[0], reference_model)
    with loopscope.open(tmp_path / "merged.h5") as merged:
        from_merged = lens(merged.runs[1], reference_model)
    by_dask = distributed_lens.lens([a, b], folder, scheduler="sync", block_tokens=3)
    shared_model = distributed_lens.lens(b, reference_model, scheduler="threads", block_tokens=4)
    for got in (from_merged, by_dask[1], shared_model[0]):
        np.testing.assert_array_equal(got.top_ids, want.top_ids)
        np.testing.assert_allclose(got.kl_final, want.kl_final, rtol=1e-4, atol=1e-9)
        np.testing.assert_array_equal(got.settling, want.settling)
    assert [r.run_index for r in by_dask] == [0, 0] and by_dask[0].top_ids.shape[1] == 6
    with pytest.raises(LoopscopeError, match="local threads"):
        distributed_lens.lens(b, reference_model, scheduler="processes")


def test_dask_lens_checks_every_run_against_the_one_readout_it_shares(reference_model, tmp_path):
    """The driver builds one readout per file and loop; a later run it does not fit is still a one-line error."""
    pytest.importorskip("dask")
    from loopscope.analysis import distributed_lens
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, tiny_config

    path = tmp_path / "two.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(torch.tensor([[1, 2, 3, 4]]), num_steps=3)  # ids within a vocabulary of 8
        reference_model(torch.tensor([[1, 2, 30, 4]]), num_steps=3)  # id 30: past it
    smaller_vocab = RavenReferenceForCausalLM(tiny_config(vocab_size=8, padded_vocab_size=8)).eval()
    assert len(distributed_lens.lens(path, smaller_vocab, runs=[0], scheduler="sync")) == 1
    with pytest.raises(LoopscopeError, match="token id 30, past the readout's vocabulary of 8") as caught:
        distributed_lens.lens(path, smaller_vocab, scheduler="sync")
    assert "\n" not in str(caught.value)


class _Looped(torch.nn.Module):
    """A model loopscope knows no family of: an embedding, one block applied four times, a norm and a head."""

    def __init__(self, vocab: int = 50, hidden: int = 12):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.block = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh())
        self.norm = torch.nn.LayerNorm(hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for _ in range(4):
            x = self.block(x)
        return self.head(self.norm(x))


def test_a_model_of_no_known_family_takes_its_readout_by_name(tmp_path):
    torch.manual_seed(0)
    model = _Looped().eval()
    with loopscope.attach(model, tmp_path / "g.h5", loop="block"), torch.no_grad():
        model(torch.randint(0, 50, (1, 6)))
    with loopscope.open(tmp_path / "g.h5") as capture:
        run = capture.runs[0]
        with pytest.raises(LoopscopeError, match="pass readout="):
            lens(run, model)
        result = lens(run, model, readout=["norm", "head"])
        want = _plain(run.states(), run.steps_of(None), lambda x: model.head(model.norm(x)))
    _assert_same(result, want)


def test_the_package_attribute_is_the_function_whatever_was_imported_first():
    import loopscope.analysis
    import loopscope.analysis.readout_lens  # noqa: F401 - importing the module must not shadow the function
    from loopscope.analysis import lens as from_package

    assert from_package is lens and callable(loopscope.analysis.lens)


class _MaskFirst(torch.nn.Module):
    """A head that rules tokens out: their logits are -inf, so their probability is exactly 0."""

    def forward(self, logits):
        return logits.masked_fill(torch.arange(logits.shape[-1]) < 5, float("-inf"))


def test_tokens_ruled_out_by_the_head_are_measured_with_0_log_0(tmp_path):
    torch.manual_seed(0)
    model = _Looped().eval()
    model.mask = _MaskFirst()
    with loopscope.attach(model, tmp_path / "m.h5", loop="block"), torch.no_grad():
        model(torch.randint(0, 50, (1, 5)))
    with loopscope.open(tmp_path / "m.h5") as capture:
        run = capture.runs[0]
        result = lens(run, model, readout=["norm", "head", "mask"])
        want = _plain(run.states(), run.steps_of(None), lambda x: model.mask(model.head(model.norm(x))))
    _assert_same(result, want)
    assert np.isfinite(result.entropy[:, :5]).all() and (result.top_ids >= 5).all()


def test_the_coda_lens_of_another_size_of_model_is_one_line(reference_model, prompt_ids, tmp_path):
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, tiny_config

    with loopscope.attach(reference_model, tmp_path / "w.h5"), torch.no_grad():
        reference_model(prompt_ids, num_steps=3)
    wider = RavenReferenceForCausalLM(tiny_config(n_embd=96, vocab_size=reference_model.config.vocab_size)).eval()
    with loopscope.open(tmp_path / "w.h5") as capture:
        with pytest.raises(LoopscopeError, match="64-wide"):
            lens(capture.runs[0], wider, "coda")
        with pytest.raises(LoopscopeError, match="block_tokens"):
            lens(capture.runs[0], reference_model, block_tokens=0)


def test_lens_csv_keeps_a_prediction_text_with_a_lone_surrogate(tmp_path):
    """A tokenizer decoding one token of a multi-byte character may return a lone surrogate; the CSV is UTF-8
    whatever the locale, with that half character as '?', not a UnicodeEncodeError."""
    from loopscope.analysis.lens_result import LensResult

    one = np.zeros((1, 1))
    result = LensResult(
        kind="readout",
        loop="core",
        run_index=0,
        steps=np.array([1]),
        last=np.array([0]),
        top_ids=np.zeros((1, 1, 1), np.int64),
        top_probs=np.ones((1, 1, 1)),
        entropy=one,
        kl_final=one,
        kl_previous=one,
        final_rank=np.zeros((1, 1), np.int64),
        final_prob=np.ones((1, 1)),
        tokens=["é\udcff"],
        top1_text=np.array([["\udcffü"]], dtype=object),
    )
    assert result.to_csv(tmp_path / "lens.csv") == 1
    text = (tmp_path / "lens.csv").read_text(encoding="utf-8")
    assert "é?" in text and "?ü" in text


def test_coda_lens_from_a_bf16_checkpoint_is_that_models_own_logits(new_reference_model, prompt_ids, tmp_path):
    """The checkpoint is loaded in its stored dtype: the last step of a prefill run is the bf16 model's own logits
    (transformers 4.x loads float32 unless told, which once gave a float32 model's answers)."""
    model = new_reference_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    path = tmp_path / "c.h5"
    with loopscope.attach(model, path), torch.no_grad():
        torch.manual_seed(0)
        logits = model(prompt_ids, num_steps=8).logits[0].double()
    with loopscope.open(path) as capture:
        result = lens(capture.runs[0], str(tmp_path / "ckpt"), "coda")
    top = torch.topk(torch.softmax(logits, -1), 5)
    np.testing.assert_array_equal(result.top_ids[:, -1], top.indices.numpy())
    np.testing.assert_allclose(result.top_probs[:, -1], top.values.numpy(), rtol=RTOL)


def _blown_capture(path) -> tuple[int, int]:
    """A demo-model capture whose token 1 has a NaN state mid-loop and token 2 a NaN last state (h5py rewrites the
    chunk checksums); returns the number of tokens and stored steps."""
    import h5py

    from loopscope.models.demo import build_demo_model

    model, tok = build_demo_model()
    ids = tok("A looped model iterates.", return_tensors="pt").input_ids
    with loopscope.attach(model, path, tokenizer=tok), torch.no_grad():
        model(ids, num_steps=4)
    with h5py.File(f"{path}.runs/000000.h5", "a") as f:
        states = f["loops/core/states"]
        states[1, 2] = np.nan
        states[2, -1] = np.inf
        return states.shape[0], states.shape[1]


def test_nan_and_inf_states_predict_nothing_and_never_settle(tmp_path):
    """A step from a NaN or infinite state has no prediction: id and rank -1, the rest NaN, never settled, empty CSV
    cells, and the same warning as the other commands (not an arbitrary top-1 of a NaN row, rank 0, settled)."""
    import csv

    from typer.testing import CliRunner

    from loopscope.cli.app import app
    from loopscope.models.demo import MODEL_DIR

    path = tmp_path / "blown.h5"
    n_tokens, n_slots = _blown_capture(path)
    with loopscope.open(path) as capture:
        results = [lens(capture.runs[0], MODEL_DIR, kind) for kind in ("logit", "coda")]
    for r in results:  # the coda attends over the sequence: token 1's NaN reaches later tokens at that step
        blank = r.top1 < 0
        assert blank[1, 2] and blank[2, -1] and (r.final_rank[blank] == -1).all() and np.isnan(r.entropy[blank]).all()
        assert np.isnan(r.top_probs[blank]).all() and np.isnan(r.kl_final[blank]).all()
        assert np.isnan(r.kl_previous[1, 3]) and np.all(r.final_rank[2] == -1) and np.isnan(r.final_prob[2]).all()
        assert np.isnan(r.kl_final[2]).all() and r.settling[2] == n_slots and r.settling_iteration[2] == -1
        assert r.settling[1] >= 3 and not any(blank[t, r.settling[t] :].any() for t in range(n_tokens))
    logit = results[0]
    assert logit.nonfinite_tokens().tolist() == [1, 2] and logit.nonfinite_steps.sum() == 2 and logit.settling[1] == 3
    out = tmp_path / "lens.csv"
    result = CliRunner().invoke(app, ["lens", str(path), "--model", str(MODEL_DIR), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "run 0: 2 token(s) have NaN or infinite states (first: token 1)" in result.output
    with open(out, newline="") as handle:
        rows = {(int(row["token_index"]), int(row["step"])): row for row in csv.DictReader(handle)}
    for key in ((1, 2), (2, n_slots - 1)):
        blank = ("top1_id", "top1_text", "top1_prob", "final_token_rank", "settled", "topk_ids", "topk_probs")
        assert all(rows[key][name] == "" for name in blank), rows[key]
    assert rows[(1, 1)]["settled"] == "0" and rows[(2, 0)]["settled"] == "0" and rows[(2, 0)]["final_token_rank"] == ""
    assert rows[(1, 3)]["settled"] == "1" and rows[(0, 0)]["top1_id"] != ""
    figure = tmp_path / "lens.png"
    result = CliRunner().invoke(app, ["lens", str(path), "--model", str(MODEL_DIR), "--out", str(figure)])
    assert result.exit_code == 0 and (tmp_path / "lens_settling.png").exists(), result.output
    from loopscope.report import write_report
    from loopscope.report.page import page_data, unpacked

    with loopscope.open(path) as capture:  # the report's lens panel gets no prediction there either
        page = page_data(write_report(capture, tmp_path / "r.html", model=MODEL_DIR))["runs"][0]["lens"]
    top_ids = unpacked(page["top_ids"])
    assert (top_ids[1, 2] == -1).all() and (top_ids[2, -1] == -1).all() and (top_ids[0] >= 0).all()
