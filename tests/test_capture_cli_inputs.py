"""`capture` (and the lens reading a checkpoint) on damaged or odd inputs: one `error:` line, never a traceback;
its own inputs never overwritten; a capture that would store nothing refused, with no empty file left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_messages import _cli  # one line and exit code 1 per error, never a traceback
from typer.testing import CliRunner

import loopscope
from loopscope.cli.app import app
from loopscope.hooks import pretrained
from loopscope.models import ouro_reference


@pytest.fixture(scope="module")
def saved(new_reference_model, tokenizer, tmp_path_factory) -> Path:
    """The tiny reference model and its tokenizer, saved with save_pretrained. Tests copy it before changing it."""
    folder = tmp_path_factory.mktemp("saved") / "model"
    new_reference_model().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def capture_of_saved(two_run_capture, tmp_path_factory) -> Path:
    return two_run_capture(tmp_path_factory.mktemp("cap") / "cap.h5", "Hello loop.", 2, 1, 2)


def _copy(saved: Path, tmp_path: Path, name: str = "copy") -> Path:
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    return folder


def test_truncated_weights_are_one_line(saved, capture_of_saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, output = _cli("capture", folder, "--prompt", "hi", "--out", tmp_path / "o.h5")
    assert code == 1 and "cannot load" in output
    for command, suffix in (("lens", "csv"), ("report", "html")):
        code, output = _cli(command, capture_of_saved, "--model", folder, "--out", tmp_path / f"x.{suffix}")
        assert code == 1 and "model.safetensors" in output and "re-download" in output


def test_missing_shard_is_named(new_reference_model, capture_of_saved, tmp_path):
    folder = tmp_path / "sharded"
    new_reference_model().save_pretrained(folder, max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["transformer.wte.weight"]
    os.remove(folder / shard)
    code, output = _cli("lens", capture_of_saved, "--model", folder, "--out", tmp_path / "l.csv")
    assert code == 1 and shard in output and "is missing" in output


@pytest.mark.parametrize("command", ["capture", "lens"])
@pytest.mark.parametrize(
    ("content", "message"),
    [("[]", "holds no model configuration"), ("null", "holds no model configuration"), ("{'a'", "not readable JSON")],
)
def test_a_config_that_is_no_object_is_one_line_in_capture_and_lens(
    saved, capture_of_saved, tmp_path, command, content, message
):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_text(content)
    if command == "capture":
        code, output = _cli("capture", folder, "--prompt", "hi", "--out", tmp_path / "o.h5")
    else:
        code, output = _cli("lens", capture_of_saved, "--model", folder, "--out", tmp_path / "l.csv")
    assert code == 1 and message in output and "config.json" in output and "re-download" in output


@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cuda:99" if torch.cuda.is_available() else "cuda"])
def test_unusable_device_is_refused(saved, tmp_path, device):
    code, output = _cli("capture", saved, "--prompt", "hi", "--out", tmp_path / "o.h5", "--device", device)
    assert code == 1 and f"--device {device}" in output
    assert not (tmp_path / "o.h5").exists()


@pytest.mark.parametrize("seed", ["99999999999999999999", "-1"])
def test_seed_out_of_range_is_refused(saved, tmp_path, seed):
    code, output = _cli("capture", saved, "--prompt", "hi", "--out", tmp_path / "o.h5", "--seed", seed)
    assert code == 1 and f"--seed {seed}" in output


def test_capture_loads_the_ouro_reference(tokenizer, tmp_path):
    folder = tmp_path / "ouro"
    torch.manual_seed(0)
    ouro_reference.OuroReferenceForCausalLM(ouro_reference.tiny_config(vocab_size=len(tokenizer))).save_pretrained(
        folder
    )
    tokenizer.save_pretrained(folder)
    # a fresh interpreter: other tests (the lens) register the Ouro reference in this one
    command = "from loopscope.cli.app import app; app()"
    args = ["capture", str(folder), "--prompt", "Hello loop.", "--out", str(tmp_path / "o.h5")]
    done = subprocess.run([sys.executable, "-c", command, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "wrote" in done.stdout, done.stdout + done.stderr


def test_generated_tokens_without_generation_is_refused_before_loading(saved, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pretrained, "load_pretrained", no_load)
    for extra in ((), ("--max-new-tokens", "0")):
        out = tmp_path / "o.h5"
        code, output = _cli("capture", saved, "--prompt", "hi", "--tokens", "generated", "--out", out, *extra)
        assert code == 1 and "--max-new-tokens" in output and "nothing would be stored" in output
        assert not out.exists()


def test_indices_past_every_prompt_are_refused(saved, tmp_path):
    out = tmp_path / "o.h5"
    code, output = _cli("capture", saved, "--prompt", "Hello loop.", "--steps", "2", "--tokens", "999", "--out", out)
    assert code == 1 and "nothing would be stored" in output
    assert not out.exists() and not Path(f"{out}.runs").exists()


def test_a_capture_that_stored_nothing_is_an_error_and_leaves_no_file(saved, tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "_check_selects", lambda tokens, longest: None)  # as if generate() stopped early
    out = tmp_path / "o.h5"
    code, output = _cli("capture", saved, "--prompt", "Hello loop.", "--steps", "2", "--tokens", "999", "--out", out)
    assert code == 1 and "nothing was stored" in output
    assert not out.exists() and not Path(f"{out}.runs").exists()


def test_mode_w_refuses_the_capture_own_inputs(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    before = weights.read_bytes()
    code, output = _cli("capture", folder, "--prompt", "hi", "--steps", "2", "--out", weights, "--mode", "w")
    assert code == 1 and "model.safetensors" in output and "choose another --out" in output
    assert weights.read_bytes() == before
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one prompt\n")
    code, output = _cli("capture", saved, "--prompt-file", prompts, "--steps", "2", "--out", prompts, "--mode", "w")
    assert code == 1 and "prompt file" in output
    assert prompts.read_text() == "one prompt\n"


def test_remote_code_error_names_the_flag(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "modeling_x.py").write_text(
        "from loopscope.models.huginn_reference import RavenReferenceConfig, RavenReferenceForCausalLM\n"
        "class XConfig(RavenReferenceConfig):\n    model_type = 'x_custom'\n"
        "class XModel(RavenReferenceForCausalLM):\n    config_class = XConfig\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "x_custom"
    config["auto_map"] = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XModel"}
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["capture", str(folder), "--prompt", "hi", "--out", str(tmp_path / "o.h5")])
    assert result.exit_code == 1 and "--trust-remote-code" in result.output, result.output


def test_negative_step_stride_names_the_flag(saved, tmp_path):
    code, output = _cli("capture", saved, "--prompt", "hi", "--step-stride", "-2", "--out", tmp_path / "o.h5")
    assert code == 1 and "--step-stride -2" in output and "step_stride=" not in output


def test_missing_tokenizer_is_named(saved, tmp_path):
    folder = tmp_path / "no_tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(saved / name, folder / name)
    code, output = _cli("capture", folder, "--prompt", "hi", "--out", tmp_path / "o.h5")
    assert code == 1 and "has no tokenizer" in output and "no_tokenizer" in output


def test_repeated_prompts_are_one_run_each_before_the_prompt_file(saved, tmp_path):
    """--prompt may be repeated (it once kept only the last, silently); the file's prompts follow."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Third one.\n", encoding="utf-8")
    out = tmp_path / "o.h5"
    args = ("capture", saved, "--prompt", "First.", "--prompt", "Second one.", "--prompt-file", prompts)
    code, output = _cli(*args, "--steps", "2", "--max-new-tokens", "0", "--out", out)
    assert code == 0, output
    with loopscope.open(out) as capture:
        texts = ["".join(run.tokens) for run in capture.runs]
        assert [json.loads(run.attrs["call_arguments"])["num_steps"] for run in capture.runs] == [2, 2, 2]
    assert [t.strip() for t in texts] == ["First.", "Second one.", "Third one."]
