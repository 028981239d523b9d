"""Each run stores the settings of the call that made it (``call_arguments``): the per-call knobs that decide a
run (Huginn's ``num_steps`` and exit criterion, sampling settings, a ``generation_config``'s changes) and that the
capture's config cannot say. Settings only: inputs, caches and objects are left out, and the text stays bounded."""

from __future__ import annotations

import json
import math

import numpy as np
import torch
from transformers import GenerationConfig

import loopscope
from loopscope.hooks.call_arguments import MAX_JSON, call_arguments


def _arguments(path) -> list[dict]:
    with loopscope.open(path) as capture:
        return [json.loads(run.attrs["call_arguments"]) for run in capture.runs]


def test_forward_generate_and_a_decoder_called_by_name_store_their_settings(reference_model, prompt_ids, tmp_path):
    path = tmp_path / "c.h5"
    config = GenerationConfig(max_new_tokens=2, do_sample=False)
    with loopscope.attach(reference_model, path):
        reference_model(prompt_ids, num_steps=torch.tensor([3, 1]), init_scale=0)
        reference_model.generate(prompt_ids, num_steps=4, generation_config=config, streamer=None)
        reference_model.generate_with_adaptive_compute(
            prompt_ids, generation_config=config, criterion="kl", exit_threshold=1e-3, num_steps=6
        )
    forward, generate, adaptive = _arguments(path)
    assert forward == {"init_scale": 0, "num_steps": [3, 1]}
    assert generate["num_steps"] == 4 and generate["streamer"] is None
    assert generate["generation_config"]["max_new_tokens"] == 2 and generate["generation_config"]["do_sample"] is False
    assert {k: adaptive[k] for k in ("criterion", "exit_threshold", "num_steps")} == {
        "criterion": "kl",
        "exit_threshold": 1e-3,
        "num_steps": 6,
    }


def test_only_settings_are_kept_and_the_text_stays_strict_json_and_bounded():
    loop: list = []
    loop.append(loop)  # a list holding itself: bounded depth, never a RecursionError
    kwargs = {
        "input_ids": torch.ones(1, 1, dtype=torch.long),  # an input, stored as token data already
        "past_key_values": object(),
        "temperature": float("nan"),
        "scale": torch.tensor(0.5),
        "mask": torch.zeros(64),  # more than a setting's 16 numbers
        "many": list(range(1000)),
        "loop": loop,
        "dtype": torch.bfloat16,
        "label": "x" * 5000,
        "streamer": object(),
        "sparse": torch.eye(2).to_sparse(),  # no list to make of these: left out, not the call's failure
        "flag": np.bool_(True),
        "zero_d": np.array(3),
    }
    stored = json.loads(call_arguments(kwargs))  # strict JSON: no NaN token
    assert stored == {"temperature": "nan", "scale": 0.5, "dtype": "torch.bfloat16", "flag": True, "zero_d": 3}
    big = {f"setting_{i}": "y" * 900 for i in range(40)}
    text = call_arguments({"num_steps": 32, **big})
    kept = json.loads(text)
    assert len(text) <= MAX_JSON and kept["num_steps"] == 32 and 0 < len(kept) < 41
    assert math.isclose(json.loads(call_arguments({"t": torch.tensor([1.5, 2.0])}))["t"][0], 1.5)


def test_a_call_given_an_unreadable_tensor_runs_and_is_recorded(reference_model, prompt_ids, tmp_path):
    """A sparse tensor among a call's keywords once raised inside loopscope (the call failed, and every later forward
    was taken for part of that call: nothing more was recorded)."""
    path = tmp_path / "c.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model.generate_minimal(prompt_ids, num_steps=2, max_new_tokens=1, extra=torch.eye(2).to_sparse())
        reference_model(prompt_ids, num_steps=2)
    with loopscope.open(path) as capture:
        assert [run.attrs["call"] for run in capture.runs] == ["generate_minimal", "forward"]
        assert json.loads(capture.runs[0].attrs["call_arguments"])["num_steps"] == 2
