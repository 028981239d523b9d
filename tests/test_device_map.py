"""Models placed by accelerate (``device_map=``, CPU and disk offload) are captured exactly.

Large looped models are loaded with ``device_map``: accelerate replaces module forwards with wrappers that move
weights in before each call (offloaded modules hold meta tensors in between) and move outputs between devices. The
hooks must still see every iteration, the readout norm's weights must be read from where accelerate keeps them, and
the logits must not change. There is no GPU in CI, so the maps here use the CPU and the disk.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import loopscope

accelerate = pytest.importorskip("accelerate")

STEPS = 4


def _logits(model, ids, seed=1):
    torch.manual_seed(seed)  # the reference model draws s0 at random
    with torch.no_grad():
        return model(ids, num_steps=STEPS).logits


def _check_states(path, recorder, rows=1):
    want = torch.stack([recorder.s0[0]] + recorder.states[:STEPS], dim=2)
    with loopscope.open(path) as capture:
        for row in range(rows):
            run = capture.runs[row]
            np.testing.assert_array_equal(run.num_steps, [STEPS] * run.num_tokens)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
        return capture.readout


@pytest.mark.filterwarnings("ignore:The following device_map keys do not match")  # freqs_cis: required, yet warned
def test_from_pretrained_with_a_device_map_and_disk_offload(reference_model, prompt_ids, reference_recorder, tmp_path):
    """The loader's own path: part of the loop and the readout norm live on disk until called."""
    plain = _logits(reference_model, prompt_ids)
    reference_model.save_pretrained(tmp_path / "model")
    device_map = {
        "transformer.wte": "cpu",
        "lm_head": "cpu",
        "transformer.prelude": "cpu",
        "transformer.adapter": "disk",
        "transformer.core_block.0": "cpu",
        "transformer.core_block.1": "disk",
        "transformer.coda": "disk",
        "transformer.ln_f": "disk",
        "freqs_cis": "cpu",  # the RoPE table is a buffer of the model itself
    }
    model = (
        type(reference_model)
        .from_pretrained(tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload"))
        .eval()
    )
    assert model.transformer.core_block[1].attn.Wqkv.weight.device.type == "meta"  # really offloaded
    assert torch.equal(_logits(model, prompt_ids), plain)
    with loopscope.attach(model, tmp_path / "dm.h5") as cap:
        recorder = reference_recorder(model)
        hooked = _logits(model, prompt_ids)
    assert cap.adapter.family == "huginn-raven"
    assert torch.equal(hooked, plain)
    readout = _check_states(tmp_path / "dm.h5", recorder)
    # ln_f was on disk: its weight is read from accelerate's offload store, not from the meta tensor
    assert readout.kind == "rmsnorm"
    np.testing.assert_array_equal(readout.weight, reference_model.transformer.ln_f.weight.detach().numpy())


def test_cpu_offload_every_module(reference_model, prompt_ids, reference_recorder, tmp_path):
    """accelerate.cpu_offload: every module's forward is wrapped, weights are moved in per call; generate too."""
    plain = _logits(reference_model, prompt_ids)
    torch.manual_seed(2)
    plain_out = reference_model.generate(prompt_ids, num_steps=STEPS, max_new_tokens=3, do_sample=False)
    accelerate.cpu_offload(reference_model, execution_device="cpu")
    assert reference_model.transformer.ln_f.weight.device.type == "meta"
    with loopscope.attach(reference_model, tmp_path / "off.h5") as cap:
        recorder = reference_recorder(reference_model)
        hooked = _logits(reference_model, prompt_ids)
        torch.manual_seed(2)
        out = reference_model.generate(prompt_ids, num_steps=STEPS, max_new_tokens=3, do_sample=False)
    assert torch.equal(hooked, plain) and torch.equal(out, plain_out)
    assert cap.adapter.loops[0].exit == "transformer.core_block.1"
    _check_states(tmp_path / "off.h5", recorder)
    prompt = prompt_ids.shape[1]
    with loopscope.open(tmp_path / "off.h5") as capture:
        gen = capture.runs[1]
        assert gen.attrs["call"] == "generate"
        # prefill + two fed-back tokens (the third is sampled from the last forward's logits)
        np.testing.assert_array_equal(gen.token_ids, out[0, : prompt + 2].numpy())
        np.testing.assert_array_equal(gen.num_steps, [STEPS] * (prompt + 2))
        # the last decoded token's final state, as the hand-written hook saw it
        np.testing.assert_array_equal(gen.states(token=prompt + 1)[-1], recorder.states[-1][0, -1].numpy())


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Looped(nn.Module):
    """A model no adapter knows: embed -> block x 3 -> head, found by the probe forward."""

    def __init__(self):
        super().__init__()
        self.embed, self.block, self.head = nn.Embedding(16, 8), Block(), nn.Linear(8, 16)

    def forward(self, ids):
        x = self.embed(ids)
        for _ in range(3):
            x = self.block(x)
        return self.head(x)


def test_detection_under_offload(tmp_path):
    """The probe runs on a model whose weights are meta tensors between calls (inputs go where the hooks say)."""
    torch.manual_seed(0)
    model = Looped()
    ids = torch.randint(0, 16, (2, 5))
    with torch.no_grad():
        plain = model(ids)
    accelerate.cpu_offload(model, execution_device="cpu")
    assert model.block.lin.weight.device.type == "meta"
    s0, seen = [], []
    with loopscope.attach(model, tmp_path / "det.h5") as cap:  # the probe runs here
        handles = [
            model.block.register_forward_pre_hook(lambda m, a: None if s0 else s0.append(a[0].clone())),
            model.block.register_forward_hook(lambda m, a, o: seen.append(o.clone())),
        ]
        with torch.no_grad():
            hooked = model(ids)
    for handle in handles:
        handle.remove()
    assert cap.adapter.family == "detected" and cap.adapter.loops[0].exit == "block"
    assert torch.equal(hooked, plain)
    want = torch.stack(s0 + seen, dim=2)
    with loopscope.open(tmp_path / "det.h5") as capture:
        for row, run in enumerate(capture.runs):
            np.testing.assert_array_equal(run.num_steps, [3] * 5)
            np.testing.assert_array_equal(run.states(), want[row].numpy())
