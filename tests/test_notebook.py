"""Jupyter's view of real captures: ``CaptureFile._repr_html_`` (header, runs table, capped) and ``Run._repr_html_``
(summary and the inline heatmap), escaped, and never an exception for a damaged run or a figure that fails."""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import matplotlib.image
import numpy as np
import pytest
import torch

import loopscope
from loopscope import notebook
from loopscope.analysis import convergence, figure_axes
from loopscope.storage import display
from loopscope.storage.merge import merge

HOSTILE = "<script>alert(1)</script>"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class MarkupTokenizer:
    """The test tokenizer, except that one token id decodes to a script tag."""

    def __init__(self, tokenizer, token_id: int):
        self.tokenizer, self.token_id = tokenizer, token_id

    def decode(self, ids, **kwargs):
        return HOSTILE if list(ids) == [self.token_id] else self.tokenizer.decode(ids, **kwargs)


@pytest.fixture(scope="module")
def generated(two_run_capture, tmp_path_factory):
    """Run 0: generate() at 4 steps; run 1: a forward over the prompt at 6 steps."""
    return two_run_capture(tmp_path_factory.mktemp("gen") / "cap.h5", "Tokens settle at different speeds.", 4, 3, 6)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tokenizer, new_reference_model):
    """A forward whose third token's text is a script tag, in a capture whose model name is markup too."""
    path = tmp_path_factory.mktemp("hostile") / "cap.h5"
    ids = tokenizer("Looped models think by iterating.", return_tensors="pt").input_ids
    model = new_reference_model()
    with loopscope.attach(model, path, tokenizer=MarkupTokenizer(tokenizer, int(ids[0, 2]))), torch.no_grad():
        model(ids, num_steps=3)
    with h5py.File(path, "a") as f:
        f.attrs["name_or_path"] = np.bytes_(b"<img src=x onerror=alert(2)>")
    return path


def _rows(text: str) -> list[list[str]]:
    """The cells of the runs table, as text."""
    body = re.search(r"<tbody>(.*?)</tbody>", text, re.S)
    assert body is not None, text
    return [
        [html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body.group(1))
    ]


def _png(text: str) -> bytes:
    found = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(found) == 1, text[:2000]
    return base64.b64decode(found[0], validate=True)


def _copy(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copyfile(path, folder / path.name)
    shutil.copytree(str(path) + ".runs", str(folder / path.name) + ".runs")
    return folder / path.name


def test_capture_summary_lists_every_run_with_its_values(generated):
    with loopscope.open(generated) as capture:
        text = capture._repr_html_()
        runs = capture.runs
        expected = [
            [str(run.index), kind, str(run.num_tokens), f"{steps}-{steps}", "float32", "complete"]
            for run, kind, steps in zip(runs, ("generate", "prefill"), (4, 6))
        ]
        sizes = [f"{Path(run.path).stat().st_size / 1024:.1f} KiB" for run in runs]
    assert [row[:-1] for row in _rows(text)] == expected
    assert [row[-1] for row in _rows(text)] == sizes
    assert html.escape(str(generated)) in text and "huginn-raven" in text and "RavenReferenceForCausalLM" in text


def test_markup_from_the_file_is_escaped(hostile):
    with loopscope.open(hostile) as capture:
        run = capture.runs[0]
        assert HOSTILE in "".join(run.tokens)
        capture_text, run_text = capture._repr_html_(), run._repr_html_()
    assert "<script" not in capture_text + run_text and "<img src=x" not in capture_text
    assert html.escape(HOSTILE) in run_text
    assert html.escape("<img src=x onerror=alert(2)>") in capture_text
    _png(run_text)  # the token text labels the heatmap too, and draws


def test_a_run_shows_its_summary_and_an_inline_heatmap_that_decodes(generated):
    with loopscope.open(generated) as capture:
        run = capture.runs[0]
        text = run._repr_html_()
        prompt = int(np.sum(run.forward_index == 0))
        tokens = run.num_tokens
    assert f"generate ({prompt} prompt + {tokens - prompt} generated tokens)" in text
    assert "complete" in text and "s* = final" in text and "first" not in text  # every token drawn
    png = _png(text)
    assert png.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(io.BytesIO(png))
    assert image.ndim == 3 and image.shape[1] == 9 * figure_axes.DPI and image.shape[0] >= 3 * figure_axes.DPI


def test_a_long_run_draws_its_first_tokens_and_says_so(generated, monkeypatch):
    monkeypatch.setattr(notebook, "MAX_TOKENS", 5)
    with loopscope.open(generated) as capture:
        run = capture.runs[1]
        text, tokens = run._repr_html_(), run.num_tokens
    assert f"first 5 of {tokens} tokens drawn" in text
    assert matplotlib.image.imread(io.BytesIO(_png(text))).shape[0] == 3 * figure_axes.DPI  # 5 rows: the least height


def test_the_inline_distances_are_those_of_the_analysis(generated, monkeypatch):
    monkeypatch.setattr(notebook, "BLOCK_BYTES", 1)  # read one token at a time
    with loopscope.open(generated) as capture:
        run = capture.runs[0]
        inline, space = notebook._distances(run, "core", 5)
        full = convergence(run)
    assert space == "readout" and inline.shape == (5, int(run.num_steps[:5].max()) + 1)
    np.testing.assert_allclose(inline, full[:5, : inline.shape[1]], rtol=1e-12, atol=0)
    assert np.isnan(full[:5, inline.shape[1] :]).all()


def test_a_run_of_several_loops_names_the_loop_drawn(hrm_capture):
    with loopscope.open(hrm_capture) as capture:
        run = capture.runs[0]
        steps = {loop: run.iterations_of(loop) for loop in run.loops}
        run_text, capture_text = run._repr_html_(), capture._repr_html_()
    assert list(steps) == ["H", "L"]
    assert "loop H drawn (this run has loops H, L; convergence(run, loop=&#x27;L&#x27;))" in run_text
    _png(run_text)
    spans = ", ".join(f"{loop} {s.min()}-{s.max()}" for loop, s in steps.items())
    assert _rows(capture_text)[0][3] == spans


def test_damaged_and_incomplete_runs_show_their_status(generated, tmp_path):
    path = _copy(generated, tmp_path / "damaged")
    run_file = Path(str(path) + ".runs") / "000001.h5"
    with open(run_file, "r+b") as f:
        f.truncate(run_file.stat().st_size // 2)
    shutil.copyfile(Path(str(path) + ".runs") / "000000.h5", Path(str(path) + ".runs") / "000002.partial.h5")
    with loopscope.open(path) as capture:
        rows = _rows(capture._repr_html_())
        run_text = capture.run(1)._repr_html_()
    assert [row[5] for row in rows[:1]] == ["complete"]
    assert rows[1][5].startswith("damaged: ") and "000001.h5" in rows[1][5]
    assert rows[2][:6] == ["2", "-", "-", "-", "-", "incomplete"]
    assert "damaged: " in run_text and "<img" not in run_text


def test_a_figure_that_fails_is_a_one_line_note(generated):
    def broken(run):
        raise RuntimeError("no canvas\nsecond line")

    display.register_run_figure(broken)
    try:
        with loopscope.open(generated) as capture:
            text = capture.runs[0]._repr_html_()
    finally:
        display.unregister_run_figure(broken)
    assert "<em>figure not drawn: no canvas</em>" in text and "second line" not in text
    _png(text)  # the heatmap registered before it still draws


def test_a_merged_capture_and_its_runs(two_run_capture, tmp_path):
    a = two_run_capture(tmp_path / "a.h5", "Looped models think.", 4, 2, 5)
    b = two_run_capture(tmp_path / "b.h5", "The state settles.", 3, 2, 6)
    merged = tmp_path / "merged.h5"
    merge(str(merged), [str(a), str(b)])
    with loopscope.open(merged) as capture:
        text = capture._repr_html_()
        run_text = capture.runs[3]._repr_html_()
    rows = _rows(text)
    assert [row[:4] for row in rows] == [
        ["0", "generate", rows[0][2], "4-4"],
        ["1", "prefill", rows[1][2], "5-5"],
        ["2", "generate", rows[2][2], "3-3"],
        ["3", "prefill", rows[3][2], "6-6"],
    ]
    assert all(row[5] == "complete" and row[6].endswith(" + source") for row in rows)
    assert "merged from" in text and "2 capture(s)" in text
    assert "b.h5, run 1" in run_text
    _png(run_text)


def test_a_capture_of_many_runs_lists_the_first_ones(new_reference_model, tmp_path):
    path = tmp_path / "many.h5"
    model = new_reference_model()
    with loopscope.attach(model, path), torch.no_grad():
        model(torch.arange(3, 9).repeat(display.MAX_ROWS + 3, 1), num_steps=2)
    with loopscope.open(path) as capture:
        assert len(capture.runs) == display.MAX_ROWS + 3
        text = capture._repr_html_()
    assert [row[0] for row in _rows(text)] == [str(n) for n in range(display.MAX_ROWS)]
    assert "... 3 more run(s)" in text


def test_importing_registers_the_heatmap_without_loading_matplotlib(generated):
    """``import loopscope`` alone makes a run show its heatmap; matplotlib (and numpy) load only when one is drawn,
    and pyplot never (it would switch a notebook's backend)."""
    code = (
        "import sys, loopscope\n"
        "print(sorted(m for m in ('numpy', 'matplotlib', 'torch') if m in sys.modules))\n"
        f"text = loopscope.open({str(generated)!r}).runs[0]._repr_html_()\n"
        "print('data:image/png;base64,' in text, 'matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "True False"], result.stdout + result.stderr
