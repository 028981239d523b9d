"""Where `plot`, `lens`, `convergence` and `report` write, and what the report makes of unusual runs.

An output is never the capture or one of its files (also through a symlink or hard link, a sibling figure or the
``.partial`` file written first); a link at ``--out`` to anything else is replaced, never written through; a bad
``--out`` is one line. The page survives its own placeholders in token text and file names, labels each run's
stride, notes runs with no iterations or with NaN states, and holds lone surrogates from a tokenizer (as the
capture does).
"""

from __future__ import annotations

import html
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.analysis.figure_axes import steps_label
from loopscope.cli.app import app
from loopscope.errors import LoopscopeError
from loopscope.models.demo import MODEL_DIR, run_demo
from loopscope.report import write_report
from loopscope.report.page import ASSETS, page_data

PNG = b"\x89PNG\r\n\x1a\n"


class TableTokenizer:
    """Decodes id ``i`` as ``texts[i % len(texts)]``: token text chosen by the test."""

    def __init__(self, *texts: str):
        self.texts = texts

    def decode(self, ids, **kwargs) -> str:
        return "".join(self.texts[int(i) % len(self.texts)] for i in ids)


def _capture(model, path: Path, *, texts=("a", "b", "c"), steps=(3,), **options) -> Path:
    with loopscope.attach(model, path, tokenizer=TableTokenizer(*texts), **options), torch.no_grad():
        for n in steps:
            model(torch.arange(3, 9)[None, :], num_steps=n)
    return path


def _files(path: Path) -> dict[str, bytes]:
    """Every byte of a capture: its index and run files."""
    runs = Path(f"{path}.runs")
    return {p.name: p.read_bytes() for p in [path, *sorted(runs.iterdir())]}


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def _refused(*args, needle: str = "") -> str:
    code, output = _cli(*args)
    lines = output.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:"), output
    assert needle in lines[0], output
    return lines[0]


@pytest.fixture
def capture(new_reference_model, tmp_path) -> Path:
    return _capture(new_reference_model(), tmp_path / "cap.h5")


# ---- outputs never destroy the capture -------------------------------------------------------------------------


def test_plot_refuses_a_link_to_the_capture_and_replaces_any_other_link(capture, tmp_path):
    before = _files(capture)
    run_file = Path(f"{capture}.runs") / "000000.h5"
    (tmp_path / "sym.png").symlink_to(capture.name)
    os.link(capture, tmp_path / "hard.pdf")
    (tmp_path / "run.svg").symlink_to(run_file)
    for name, kind in (("sym.png", "heatmap"), ("hard.pdf", "curves"), ("run.svg", "pca")):
        _refused("plot", capture, "--kind", kind, "--out", tmp_path / name, needle=name)
    assert _files(capture) == before
    (tmp_path / "mine.txt").write_text("mine")
    (tmp_path / "fig.png").symlink_to("mine.txt")
    assert _cli("plot", capture, "--out", tmp_path / "fig.png")[0] == 0
    assert not (tmp_path / "fig.png").is_symlink() and (tmp_path / "fig.png").read_bytes()[:8] == PNG
    assert (tmp_path / "mine.txt").read_text() == "mine"
    assert not list(tmp_path.glob("*.partial"))


def test_a_capture_named_like_the_output_is_not_replaced(new_reference_model, tmp_path):
    for name, command in (("cap.csv", "convergence"), ("cap.html", "report"), ("cap.png", "plot")):
        path = _capture(new_reference_model(), tmp_path / name)
        before = _files(path)
        _refused(command, path, "--out", path, needle=name)
        assert _files(path) == before
    with pytest.raises(LoopscopeError, match="index of capture"):
        write_report(loopscope.open(tmp_path / "cap.html"), tmp_path / "cap.html")


def test_the_partial_file_written_first_is_never_a_link_written_through(capture, tmp_path):
    before = _files(capture)
    (tmp_path / "r.html.partial").symlink_to(Path(f"{capture}.runs") / "000000.h5")
    (tmp_path / "t.csv.partial").symlink_to(capture)
    _refused("report", capture, "--out", tmp_path / "r.html", needle="r.html")
    _refused("convergence", capture, "--out", tmp_path / "t.csv", needle="t.csv")
    assert _files(capture) == before
    (tmp_path / "f.png.partial").symlink_to("elsewhere.png")  # a dangling link left behind: removed, not followed
    assert _cli("plot", capture, "--out", tmp_path / "f.png")[0] == 0
    assert not (tmp_path / "elsewhere.png").exists() and not (tmp_path / "f.png.partial").exists()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return run_demo(tmp_path_factory.mktemp("demo"), steps=4, max_new_tokens=1).capture


def test_lens_outputs_and_their_siblings_spare_the_capture(demo, tmp_path):
    before = _files(demo)
    (tmp_path / "g_kl.png").symlink_to(demo)
    (tmp_path / "g_settling.svg").symlink_to(Path(f"{demo}.runs") / "000000.h5")
    os.link(demo, tmp_path / "t.csv")
    _refused("lens", demo, "--model", MODEL_DIR, "--out", tmp_path / "g.png", needle="g_kl.png")
    _refused("lens", demo, "--model", MODEL_DIR, "--out", tmp_path / "g.svg", needle="g_settling.svg")
    _refused("lens", demo, "--model", MODEL_DIR, "--out", tmp_path / "t.csv", needle="t.csv")
    assert _files(demo) == before


# ---- a bad --out is one line --------------------------------------------------------------------------------------


def test_an_out_that_cannot_be_written_is_one_line(capture, demo, tmp_path):
    (tmp_path / "dir.html").mkdir()
    (tmp_path / "dir.csv").mkdir()
    (tmp_path / "p.html.partial").mkdir()
    long = "a" * (255 - len(".html"))  # a legal name whose .partial is too long
    for args in (
        ("report", capture, "--out", tmp_path / "dir.html"),
        ("convergence", capture, "--out", tmp_path / "dir.csv"),
        ("lens", demo, "--model", MODEL_DIR, "--out", tmp_path / "dir.csv"),
        ("report", capture, "--out", tmp_path / "p.html"),
        ("report", capture, "--out", tmp_path / f"{long}.html"),
        ("convergence", capture, "--out", tmp_path / f"{long[:-1]}.csv"),
    ):
        _refused(*args)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["cap.h5", "cap.h5.runs", "dir.csv", "dir.html", "p.html.partial"]  # nothing half-written


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_unwritable_directory_is_one_line(capture, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        _refused("report", capture, "--out", locked / "r.html", needle="cannot write")
        _refused("convergence", capture, "--out", locked / "t.csv", needle="cannot write")
    finally:
        locked.chmod(0o755)


# ---- the page ---------------------------------------------------------------------------------------------------


def test_placeholders_in_token_text_and_the_file_name_stay_text(new_reference_model, tmp_path):
    script = (ASSETS / "report.js").read_text(encoding="utf-8")
    texts = ("a", "__SCRIPT__", "__DATA__", "__TITLE__", "__STYLE__")
    for name in ("tok.h5", "__DATA__.h5", "x__SCRIPT__.h5"):
        path = _capture(new_reference_model(), tmp_path / name, texts=texts)
        out = write_report(loopscope.open(path), tmp_path / f"{name}.html")
        page = out.read_text(encoding="utf-8")
        data = page_data(out)
        assert data["title"].startswith(name) and set(data["runs"][0]["tokens"]) <= set(texts)
        assert f"<title>{html.escape(data['title'])}</title>" in page
        assert page.count(script) == 1 and page.index(script) > page.index('id="loopscope-data"')


def test_each_run_is_labelled_with_its_own_stride(new_reference_model, tmp_path):
    path = _capture(new_reference_model(), tmp_path / "mixed.h5", steps=(7,))
    _capture(new_reference_model(), path, steps=(7,), mode="a", step_stride=3)
    runs = page_data(write_report(loopscope.open(path), tmp_path / "r.html"))["runs"]
    assert [(r["step_stride"], r["steps_label"]) for r in runs] == [(1, steps_label(1)), (3, steps_label(3))]
    assert "1 in 3 iterations" in runs[1]["steps_label"] and runs[0]["steps_label"] == "Iterations at Test-Time"


def test_a_run_without_iterations_is_noted_not_dropped(new_reference_model, tmp_path):
    with pytest.warns(UserWarning, match="recorded no iteration of its loop"):  # said at capture, once
        path = _capture(new_reference_model(), tmp_path / "zero.h5", steps=(3, 0))
    data = page_data(write_report(loopscope.open(path), tmp_path / "r.html"))
    assert [r["run"] for r in data["runs"]] == [0]
    assert any(n.startswith("run 1 left out:") and "no loop iterations" in n for n in data["notes"]), data["notes"]
    with pytest.raises(LoopscopeError, match="run 1 ran no loop iterations"):
        write_report(loopscope.open(path), tmp_path / "alone.html", runs=[1])
    _refused("report", path, "--run", "1", "--out", tmp_path / "alone.html", needle="no loop iterations")


def test_nan_and_inf_states_get_a_note_in_the_page(reference_model, tmp_path):
    with torch.no_grad():
        reference_model.transformer.core_block[0].mlp.fc.weight[0, 0] = float("inf")
    path = _capture(reference_model, tmp_path / "blown.h5")
    view = page_data(write_report(loopscope.open(path), tmp_path / "r.html"))["runs"][0]
    assert any("6 token(s) have NaN or infinite states" in note for note in view["notes"]), view["notes"]


# ---- text a tokenizer or a damaged file can hold ------------------------------------------------------------------


def test_a_lone_surrogate_from_the_tokenizer_is_kept_readable(new_reference_model, tmp_path):
    partial = b"\xe2\x82".decode("utf-8", "surrogateescape")  # a byte-level tokenizer's half character
    texts = ("ok", partial, "\ud800x")
    model = new_reference_model()
    path = _capture(model, tmp_path / "s.h5", texts=texts)  # the run is written whole, not left .partial
    with loopscope.open(path) as capture:
        assert capture.runs[0].tokens == ["ok", "\ufffd", "?x"] * 2
    out = write_report(loopscope.open(path), tmp_path / "r.html", model=model, tokenizer=TableTokenizer(*texts))
    vocab = set(page_data(out)["runs"][0]["lens"]["vocab"].values())
    assert vocab <= {"ok", "\ufffd", "?x"} and "\ufffd" in vocab


def test_attributes_that_hold_arrays_are_read_as_absent(capture, tmp_path):
    with h5py.File(Path(f"{capture}.runs") / "000000.h5", "a") as f:
        f.attrs["call"] = np.array([b"generate", b"forward"])
    with h5py.File(capture, "a") as f:
        f.attrs["model_class"] = np.arange(3)
    assert _cli("plot", capture, "--out", tmp_path / "x.png")[0] == 0
    assert _cli("report", capture, "--out", tmp_path / "r.html")[0] == 0
    data = page_data(tmp_path / "r.html")
    assert data["runs"][0]["call"] == "forward" and data["runs"][0]["prompt"] is None
    assert data["source"].startswith("cap.h5 · model · ")
