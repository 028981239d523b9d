"""What the command line says when something is off: the folder or directory it names, the flag it asks for, the
counts it gives, and nothing at all on stderr when nothing is off."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest
import torch
import typer
from typer.testing import CliRunner

import loopscope
from loopscope.cli.app import app
from loopscope.cli.output import for_cli
from loopscope.errors import CaptureFileError, LoopscopeError
from loopscope.hooks.pretrained import check_model_path
from loopscope.models.demo import run_demo
from loopscope.storage.index import check_target


@pytest.fixture(scope="module")
def capture_path(two_run_capture, tmp_path_factory) -> Path:
    """Run 0: generate (prompt and 2 new tokens); run 1: a forward over the prompt alone. Tests only read it."""
    return two_run_capture(tmp_path_factory.mktemp("messages") / "cap.h5", "Short prompt.", 3, 2, 2)


def _cli(*args) -> tuple[int, str]:
    """(exit code, output) of one command; an error is one line starting with 'error:', never a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("error:"), result.output
    return result.exit_code, result.output


def test_missing_run_folder_is_named_unless_the_capture_is_empty(capture_path, reference_model, tmp_path):
    index = tmp_path / "moved.h5"
    shutil.copyfile(capture_path, index)  # the index alone, as if copied without its .runs folder
    with pytest.raises(CaptureFileError, match=r"moved\.h5\.runs is missing"):
        loopscope.open(index)
    for args in (("info", index), ("plot", index, "--out", tmp_path / "x.png")):
        code, output = _cli(*args)
        assert code == 1 and "moved.h5.runs is missing" in output and "no complete runs" not in output

    unclosed = tmp_path / "unclosed.h5"  # killed before its clean close: the index lists no runs, yet had some
    shutil.copyfile(capture_path, unclosed)
    with h5py.File(unclosed, "a") as f:
        del f["runs"]
    with pytest.raises(CaptureFileError, match=r"unclosed\.h5\.runs is missing"):
        loopscope.open(unclosed)

    empty = tmp_path / "empty.h5"  # closed with no runs; its empty folder is easily lost (git keeps none)
    with loopscope.attach(reference_model, empty):
        pass
    shutil.rmtree(str(empty) + ".runs")
    with loopscope.open(empty) as capture:
        assert capture.runs == []
    assert _cli("info", empty)[0] == 0


def test_missing_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in (tmp_path / "no" / "model", "./no-model", "~/no-such-loopscope-model", "models/huginn"):
        code, output = _cli("capture", model, "--prompt", "hi", "--out", tmp_path / "c.h5")
        assert code == 1 and f"model directory {model} does not exist" in output, output
        assert "repo" not in output.lower()
    for hub_id in ("gpt2", "tomg-group-umd/huginn-0125"):
        check_model_path(hub_id)  # left to transformers: they name hub repositories
    with pytest.raises(LoopscopeError, match="model directory a/b/c does not exist"):
        check_model_path("a/b/c")


def test_cli_errors_name_flags_not_python_keywords(capture_path, tmp_path):
    code, output = _cli("capture", "gpt2", "--prompt", "hi", "--out", capture_path)  # refused before any load
    assert code == 1 and "pass --mode w to overwrite it or --mode a to add runs to it" in output, output
    with pytest.raises(CaptureFileError, match="pass mode='w'"):  # the API keeps its own words
        check_target(str(capture_path), "w-")

    one = tmp_path / "one.h5"
    shutil.copyfile(capture_path, one)
    shutil.copytree(str(capture_path) + ".runs", str(one) + ".runs")
    (Path(str(one) + ".runs") / "000001.h5").unlink()
    code, output = _cli("info", one)
    assert code == 1 and "pass --missing skip to read the rest" in output and "missing='skip'" not in output

    lock = for_cli("cannot lock x.h5.runs (Errno 38); on a network file system pass locking=False")
    assert "locking=False" not in lock and "local disk" in lock
    assert for_cli("pass --force (force=True) to replace it") == "pass --force to replace it"
    assert for_cli("use space='state' for the raw latent state") == "use --space state for the raw latent state"
    assert "--step-stride 1 or --tokens to" in for_cli("use step_stride=1 or tokens= to save space")
    assert "--trust-remote-code" in for_cli("(a model with its own code needs trust_remote_code=True)")


def test_a_shorter_reference_says_how_many_tokens_each_has(capture_path, tmp_path):
    with loopscope.open(capture_path) as capture:
        long, short = capture.run(0).num_tokens, capture.run(1).num_tokens
    assert short < long
    code, output = _cli("plot", capture_path, "--run", 0, "--reference", 1, "--out", tmp_path / "x.png")
    assert code == 1 and "covers other tokens" not in output, output
    assert f"reference run 1 has {short} token(s) and run 0 has {long}" in output
    assert "must cover at least the run's tokens" in output
    assert _cli("plot", capture_path, "--run", 1, "--reference", 0, "--out", tmp_path / "y.png")[0] == 0


def test_every_run_option_documents_negative_indices():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    documented = {}
    for name, command in commands.items():
        for param in command.params:
            if "--run" in getattr(param, "opts", ()):
                documented[name] = param.help
    assert set(documented) == {"plot", "convergence", "export", "lens", "report"}
    for name, help_text in documented.items():
        assert "negative counts from the last run" in help_text and "-1" in help_text, (name, help_text)


def test_a_successful_plot_prints_nothing_on_stderr(capture_path, tmp_path):
    for args in (
        ["plot", capture_path, "--out", tmp_path / "h.png"],
        ["plot", capture_path, "--kind", "curves", "--run", 0, "--run", -1, "--out", tmp_path / "c.png"],
        ["convergence", capture_path, "--out", tmp_path / "m.csv"],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert result.stderr == "", repr(result.stderr)


def test_demo_refuses_a_previous_demo_unless_forced(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "demo.h5").write_bytes(b"a previous demo")
    code, output = _cli("demo", "--out", out, "--steps", 2, "--max-new-tokens", 1)
    assert code == 1 and "previous demo (demo.h5)" in output and "--force" in output and "force=True" not in output
    assert (out / "demo.h5").read_bytes() == b"a previous demo"
    with pytest.raises(LoopscopeError, match=r"force=True"):
        run_demo(out, steps=2, max_new_tokens=1)
    (tmp_path / "file").write_text("")
    assert _cli("demo", "--out", tmp_path / "file")[0] == 1

    assert _cli("demo", "--out", out, "--steps", 2, "--max-new-tokens", 1, "--force")[0] == 0
    with loopscope.open(out / "demo.h5") as capture:
        assert len(capture.runs) == 1
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"  # a folder with other files but no demo: nothing to replace, so no refusal
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _cli("demo", "--out", other, "--steps", 2, "--max-new-tokens", 1)[0] == 0


def test_appending_to_an_empty_capture_whose_folder_was_lost_recreates_it(reference_model, prompt_ids, tmp_path):
    """An empty capture copied without its (empty) run folder, as git does, still takes runs with mode='a'."""
    path = tmp_path / "empty.h5"
    loopscope.attach(reference_model, path).close()
    shutil.rmtree(f"{path}.runs")
    with loopscope.attach(reference_model, path, mode="a"), torch.no_grad():
        reference_model(prompt_ids, num_steps=2)
    with loopscope.open(path) as capture:
        assert [run.num_tokens for run in capture.runs] == [prompt_ids.shape[1]]
