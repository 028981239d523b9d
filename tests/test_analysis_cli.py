"""Offline analysis and the CLI on real captures of the reference model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import convergence
from loopscope.cli.app import app
from loopscope.storage.errors import LoopscopeError


@pytest.fixture
def capture_path(reference_model, tokenizer, tmp_path):
    path = tmp_path / "cap.h5"
    ids = tokenizer("Tokens settle at different speeds.", return_tensors="pt").input_ids
    with loopscope.attach(reference_model, path, tokenizer=tokenizer):
        torch.manual_seed(0)
        reference_model.generate(ids, num_steps=6, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            reference_model(ids, num_steps=4)
    return path


def test_convergence_matches_direct_numpy(capture_path):
    with loopscope.open(capture_path) as capture:
        for run in capture.runs:
            states = run.states().astype(np.float64)  # [T, K, H]
            steps = run.num_steps
            for space, f in (("state", lambda x: x), ("readout", capture.readout)):
                got = convergence(run, space=space)
                mapped = f(states)
                star = mapped[np.arange(len(steps)), steps]
                want = np.linalg.norm(mapped - star[:, None, :], axis=-1)
                assert got.shape == (run.num_tokens, steps.max() + 1)
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
                assert np.all(got[np.arange(len(steps)), steps] == 0)


def test_convergence_against_another_run(capture_path, reference_model, tokenizer, tmp_path):
    with loopscope.open(capture_path) as capture:
        short = capture.runs[1]
        d = convergence(short, reference=short)
        np.testing.assert_allclose(d, convergence(short))
        with pytest.raises(LoopscopeError, match="other tokens"):
            convergence(short, reference=capture.runs[0])
        with pytest.raises(LoopscopeError, match="space"):
            convergence(short, space="pca")


def test_cli_info_and_plot(capture_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(capture_path)])
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "forward" in result.output
    out = tmp_path / "fig.png"
    result = runner.invoke(app, ["plot", str(capture_path), "--run", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(capture_path, tmp_path):
    runner = CliRunner()
    not_h5 = tmp_path / "text.h5"
    not_h5.write_text("hello")
    cases = [
        ["info", str(tmp_path / "missing.h5")],
        ["info", str(not_h5)],
        ["plot", str(capture_path), "--run", "7", "--out", str(tmp_path / "x.png")],
        ["plot", str(capture_path), "--out", str(tmp_path / "x.jpg")],
        ["plot", str(capture_path), "--out", str(tmp_path / "nodir" / "x.png")],
    ]
    for args in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:"), result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_demo(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--steps", "12", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "demo.h5").exists()
    assert (tmp_path / "d" / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    with loopscope.open(tmp_path / "d" / "demo.h5") as capture:
        run = capture.runs[0]
        assert set(run.num_steps.tolist()) == {12}
        assert run.tokens is not None and len(run.tokens) == run.num_tokens
