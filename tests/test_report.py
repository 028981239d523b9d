"""`loopscope report`: the page's data equals the analysis, the file is self-contained and safe with hostile token
text, and the command's bad input gets one line. The page in a real browser is tested in test_report_browser.py."""

from __future__ import annotations

import json
import re

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import token_metrics, trajectory_pca
from loopscope.analysis.pca import block_trajectories
from loopscope.cli.app import app
from loopscope.models.demo import MODEL_DIR, run_demo
from loopscope.report import write_report
from loopscope.report.page import _json, page_data
from loopscope.report.page import unpacked as array
from loopscope.storage import run_files
from loopscope.storage.merge import merge


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The capture `loopscope demo` writes (prompt + 8 generated tokens at 64 steps), and its model directory."""
    out = tmp_path_factory.mktemp("demo")
    run_demo(out, steps=16, max_new_tokens=4)
    return out / "demo.h5", MODEL_DIR


def test_the_page_holds_what_the_analysis_computes(demo):
    path, _ = demo
    data = page_data(path.parent / "report.html")  # the demo's own report, with the lens of the shipped model
    assert len(data["runs"]) == 1
    view = data["runs"][0]
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        metrics = token_metrics(run, measures=("distance", "step_delta"))
        np.testing.assert_allclose(array(view["distance"]), metrics.distance.astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(array(view["step_delta"]), metrics.step_delta.astype(np.float32), rtol=1e-6)
        assert view["tokens"] == run.tokens
        assert view["prompt"] is not None and 0 < view["prompt"] < run.num_tokens  # a generate() run
        np.testing.assert_array_equal(array(view["positions"]), run.positions)
        # each token's trajectory in its own components, as trajectory_pca(basis="token") gives it
        for t in (0, run.num_tokens // 2, run.num_tokens - 1):
            (pca,) = trajectory_pca(run, [t], n_components=2)
            shown = array(view["pca"])[t, : len(pca.projections)]
            np.testing.assert_allclose(shown, pca.projections.astype(np.float32), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(array(view["explained"])[t], pca.explained, rtol=1e-4)
        lens = view["lens"]
        assert lens["kind"] == "logit" and lens["top_k"] == 3
        ids = array(lens["top_ids"])
        assert ids.shape == (run.num_tokens, array(view["distance"]).shape[1], 3)
        assert set(int(i) for i in np.unique(ids[ids >= 0])) == {int(k) for k in lens["vocab"]}


def test_the_file_is_self_contained(demo, tmp_path):
    out = write_report(loopscope.open(demo[0]), tmp_path / "r.html")
    html = out.read_text(encoding="utf-8")
    assert re.search(r"<script[^>]*\bsrc=", html) is None  # no script fetched
    assert re.search(r"<link[^>]*\bhref=", html) is None  # no stylesheet fetched
    assert "Plotly" in html and html.count("</script>") == 3  # plotly.js, the data, the page's own script
    assert not list(tmp_path.glob("*.partial"))


def test_trajectories_of_any_depth_in_one_batch_match_a_per_token_svd():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(5, 9, 16)).cumsum(axis=1)  # random walks: a few strong components
    last = np.array([8, 3, 6, 0, 8])
    states[4, 6, 2] = np.nan  # a token that blew up gets no trajectory, and spoils no other
    projections, explained = block_trajectories(states, last, 2)
    for t in range(4):
        x = states[t, : last[t] + 1] - states[t, : last[t] + 1].mean(axis=0)
        u, s, vt = np.linalg.svd(x, full_matrices=False) if last[t] else (None, np.zeros(1), np.zeros((1, 16)))
        for c in range(min(2, len(s))):
            axis = vt[c] * np.sign(vt[c][np.argmax(np.abs(vt[c]))] or 1)
            np.testing.assert_allclose(projections[t, : last[t] + 1, c], x @ axis, atol=1e-10)
            np.testing.assert_allclose(explained[t, c], s[c] ** 2 / max(np.sum(x * x), 1e-300), atol=1e-12)
        assert np.isnan(projections[t, last[t] + 1 :]).all()
    assert np.isnan(projections[4]).all()


def test_trajectories_solve_their_small_problems_on_one_blas_thread(monkeypatch):
    """Thousands of tiny ``eigh`` calls run 4-25x slower on OpenBLAS's default threads than on one (on a busy
    machine): the batch runs on one (numpy's thread count seen from inside the call), the setting is restored after,
    and the numbers are the same."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    if not blas_threads():
        pytest.skip("numpy here uses no BLAS threadpoolctl can see")
    seen, eigh = [], np.linalg.eigh
    monkeypatch.setattr(np.linalg, "eigh", lambda a: (seen.append(blas_threads()), eigh(a))[1])  # numpy's, not ours
    with threadpool_limits(limits=2, user_api="blas"):
        states = np.random.default_rng(1).normal(size=(40, 40, 16)).cumsum(axis=1)
        projections, explained = block_trajectories(states, np.full(40, 39), 2)
        assert seen and all(threads == 1 for threads in seen[0]) and set(blas_threads()) == {2}
    values, vectors = eigh((c := states - states.mean(axis=1, keepdims=True)) @ c.transpose(0, 2, 1))
    np.testing.assert_allclose(explained[:, 0] * np.einsum("bkh,bkh->b", c, c), values[:, -1], rtol=1e-12)


def test_hostile_token_text_stays_data():
    text = _json({"tokens": ["</script><script>alert(1)</script>", "<!--", "\u2028"]})
    assert "</script" not in text and "<!--" not in text
    assert json.loads(text)["tokens"][0] == "</script><script>alert(1)</script>"


def test_several_loops_are_one_entry_each_and_a_loop_without_readout_says_so(hrm_capture, new_hrm_text_model, tmp_path):
    out = write_report(loopscope.open(hrm_capture), tmp_path / "r.html", model=new_hrm_text_model())
    runs = page_data(out)["runs"]
    assert [r["loop"] for r in runs] == ["H", "L"]
    assert all(f"loop {r['loop']}" in r["label"] for r in runs)
    assert runs[0]["lens"] is not None  # H ends in the head
    assert runs[1]["lens"] is None and any("no lens predictions" in note for note in runs[1]["notes"])


def test_a_merged_capture_reports_every_source_run(two_run_capture, tmp_path):
    a = two_run_capture(tmp_path / "a.h5", "First capture.", 3, 2, 4)
    b = two_run_capture(tmp_path / "b.h5", "Second one.", 3, 2, 4)
    merge(tmp_path / "m.h5", [a, b])
    with loopscope.open(tmp_path / "m.h5") as capture:
        count = len(capture.runs)
        tokens = [run.num_tokens for run in capture.runs]
    runs = page_data(write_report(loopscope.open(tmp_path / "m.h5"), tmp_path / "r.html"))["runs"]
    assert count == 4 and [r["shape"][0] for r in runs] == tokens


def test_the_command_writes_the_page_and_checks_its_input(demo, tmp_path):
    path, model_dir = demo
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(path), "--out", str(tmp_path / "r.html"), "--model", str(model_dir)])
    assert result.exit_code == 0, result.output
    assert "r.html" in result.output and page_data(tmp_path / "r.html")["runs"][0]["lens"] is not None
    for args, message in (
        (["--out", str(tmp_path / "r.png")], "name the report .html"),
        (["--out", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["--out", str(tmp_path / "s.html"), "--model", str(tmp_path / "none")], "no such directory"),
        (["--out", str(tmp_path / "s.html"), "--run", "7"], "has no run 7"),
        (["--out", str(tmp_path / "s.html"), "--top-k", "0"], "--top-k 0"),
        (["--out", str(tmp_path / "s.html"), "--top-k", "100000"], "give 1 to 50"),  # a 40 MB page before
    ):
        result = runner.invoke(app, ["report", str(path), *args])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s.html").exists()


def test_the_state_space_on_request(demo, tmp_path):
    path, _ = demo
    result = CliRunner().invoke(app, ["report", str(path), "--space", "state", "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    view = page_data(tmp_path / "r.html")["runs"][0]
    with loopscope.open(path) as capture:
        distance = token_metrics(capture.runs[0], space="state", measures=("distance",)).distance
    assert view["space_name"] == "state"
    np.testing.assert_allclose(array(view["distance"]), distance.astype(np.float32), rtol=1e-6)
    result = CliRunner().invoke(app, ["report", str(path), "--space", "latent", "--out", str(tmp_path / "s.html")])
    assert result.exit_code == 1 and "--space latent is not one of" in result.output, result.output


def test_a_model_of_another_size_is_one_line(demo, hrm_capture, tmp_path):
    """A lens that fails for every loop is an error, not a page silently without predictions."""
    result = CliRunner().invoke(
        app, ["report", str(hrm_capture), "--out", str(tmp_path / "r.html"), "--model", str(demo[1])]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert not (tmp_path / "r.html").exists()


def test_a_damaged_run_is_left_out_with_a_note_and_the_others_reported(two_run_capture, tmp_path):
    path = two_run_capture(tmp_path / "cap.h5", "A capture with one bad sector.", 3, 2, 4)
    run_file = run_files.list_run_files(str(path))[0][0]
    with h5py.File(run_file, "r") as f:
        offset = f["loops/core/states"].id.get_chunk_info(0).byte_offset
    with open(run_file, "r+b") as fh:  # one flipped bit, as a bad disk sector would leave it
        fh.seek(offset + 40)
        byte = fh.read(1)[0]
        fh.seek(offset + 40)
        fh.write(bytes([byte ^ 0x10]))
    data = page_data(write_report(loopscope.open(path), tmp_path / "r.html"))
    assert [r["run"] for r in data["runs"]] == [1]
    assert any(note.startswith("run 0 left out:") for note in data["notes"])
    result = CliRunner().invoke(app, ["report", str(path), "--run", "0", "--out", str(tmp_path / "s.html")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output  # asked for it alone: an error


def test_a_checkpoints_head_and_tokenizer_are_read_once_for_every_run(tmp_path, monkeypatch):
    from loopscope.analysis import lens_readout, readout_lens
    from loopscope.models.demo import build_demo_model

    model, tokenizer = build_demo_model()
    path = tmp_path / "cap.h5"
    with loopscope.attach(model, path, tokenizer=tokenizer), torch.no_grad():
        model(tokenizer("One prompt, two rows.", return_tensors="pt").input_ids.repeat(2, 1), num_steps=3)
    calls = {"head": 0, "tokenizer": 0}
    for module, name, key in ((lens_readout, "from_directory", "head"), (readout_lens, "tokenizer_of", "tokenizer")):
        original = getattr(module, name)

        def counted(*args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    runs = page_data(write_report(loopscope.open(path), tmp_path / "r.html", model=MODEL_DIR))["runs"]
    assert len(runs) == 2 and all(r["lens"] is not None for r in runs)
    assert calls == {"head": 1, "tokenizer": 1}
