"""Figures of the readout lens on hand-built results (no model), and the `loopscope lens` command's checks."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from typer.testing import CliRunner

from loopscope.analysis import lens_figures
from loopscope.analysis.lens_figures import cell_text
from loopscope.analysis.lens_result import LensResult
from loopscope.cli.app import app
from loopscope.models.demo import MODEL_DIR, run_demo

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = np.array([" the", "\n", "cat", "sat", "  on", "a-very-long-token", "$x$", "\t", "mat", "."], dtype=object)


def _result(n_tokens: int, n_steps: int, *, seed: int = 0, texts: bool = True, short: int = 0) -> LensResult:
    """A lens result of ``n_tokens`` x ``n_steps``: the first ``short`` tokens stop halfway, as adaptive exits do."""
    rng = np.random.default_rng(seed)
    top_k = 3
    last = np.full(n_tokens, n_steps - 1, dtype=np.int64)
    last[:short] = n_steps // 2
    top_ids = rng.integers(0, len(VOCAB), size=(n_tokens, n_steps, top_k))
    top_probs = np.sort(rng.random((n_tokens, n_steps, top_k)), axis=-1)[..., ::-1] / top_k
    kl_final = rng.random((n_tokens, n_steps)) * 10.0 ** rng.integers(-4, 1, size=(n_tokens, n_steps))
    kl_final[np.arange(n_tokens), last] = 0.0
    past = np.arange(n_steps)[None, :] > last[:, None]
    top_ids[past], top_probs[past], kl_final[past] = -1, np.nan, np.nan
    kl_previous = rng.random((n_tokens, n_steps))
    kl_previous[:, 0] = np.nan
    top1_text = None
    if texts:
        top1_text = np.where(top_ids[..., 0] >= 0, VOCAB[np.clip(top_ids[..., 0], 0, None)], "").astype(object)
    return LensResult(
        kind="logit",
        loop="core_block",
        run_index=0,
        steps=np.arange(n_steps, dtype=np.int64),
        last=last,
        top_ids=top_ids,
        top_probs=top_probs,
        entropy=rng.random((n_tokens, n_steps)),
        kl_final=kl_final,
        kl_previous=kl_previous,
        final_rank=np.where(past, -1, rng.integers(0, 5, size=(n_tokens, n_steps))),
        final_prob=rng.random((n_tokens, n_steps)),
        tokens=[str(VOCAB[t % len(VOCAB)]) for t in range(n_tokens)] if texts else None,
        positions=np.arange(n_tokens, dtype=np.int64) + 100,
        top1_text=top1_text,
    )


def _integer_ticks(ax) -> list[int]:
    ticks = ax.get_xticks()
    assert np.allclose(ticks, np.round(ticks)), ticks
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert all(label.lstrip("−-").isdigit() for label in labels if label), labels
    return [int(t) for t in ticks]


def _close(figures) -> None:
    for fig in figures:
        plt.close(fig)


def test_cell_text_makes_blanks_and_line_breaks_visible():
    assert cell_text(" the") == "␣the"
    assert cell_text("\n") == "⏎"
    assert cell_text("  on") == "␣␣on"
    assert cell_text("\t") == "⇥"
    assert cell_text("$x$") == r"\$x\$"
    assert cell_text("") == '""'
    assert cell_text("a-very-long-token-indeed", 6) == "a-ver…"
    assert cell_text("\x1b[31m", 10) == "\\x1b[31m"


def test_grid_cells_hold_the_top1_text_and_blank_past_the_last_step():
    result = _result(10, 3, short=4)
    (fig,) = figures = lens_figures.prediction_figures(result)
    try:
        ax = fig.axes[0]
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        expected = {
            (t, k): cell_text(result.top1_text[t, k], 10) for t in range(10) for k in range(3) if k <= result.last[t]
        }
        assert cells == expected
        assert (0, 2) not in cells and (9, 2) in cells  # token 0 stops at step 1: its last cell is blank
        assert _integer_ticks(ax) == [0, 1, 2]
        assert [label.get_text() for label in ax.get_yticklabels()] == [cell_text(t, 16) for t in result.tokens]
        right = fig.axes[1]
        assert [label.get_text() for label in right.get_yticklabels()] == [str(p) for p in range(100, 110)]
        assert "0 to 1" in fig.axes[-1].get_ylabel()
    finally:
        _close(figures)


def test_grid_without_texts_shows_ids_and_positions():
    result = _result(5, 4, texts=False)
    figures = lens_figures.prediction_figures(result)
    try:
        ax = figures[0].axes[0]
        assert sorted(t.get_text() for t in ax.texts) == sorted(str(int(i)) for i in result.top1.ravel())
        assert [label.get_text() for label in ax.get_yticklabels()] == [str(p) for p in range(100, 105)]
    finally:
        _close(figures)


def test_grid_of_64_iterations_pages_and_labels_consistently(tmp_path):
    result = _result(70, 65, short=3)
    figures = lens_figures.prediction_figures(result, rows_per_page=32)
    try:
        assert len(figures) == 3
        for number, fig in enumerate(figures):
            ax = fig.axes[0]
            ticks = _integer_ticks(ax)
            assert ticks[0] == 0 and len(ticks) <= lens_figures.MAX_STEP_TICKS and max(ticks) <= 64
            start = 32 * number
            rows = len(ax.get_yticklabels())
            assert [label.get_text() for label in ax.get_yticklabels()] == [
                cell_text(t, 16) for t in result.tokens[start : start + rows]
            ]
            assert all(len(t.get_text()) <= 6 for t in ax.texts)  # cut to fit a cell at 64 iterations
            assert "page" in ax.get_title()
    finally:
        _close(figures)
    paths = lens_figures.prediction_grid(result, tmp_path / "grid.png", rows_per_page=32)
    assert [Path(p).name for p in paths] == ["grid-p01.png", "grid-p02.png", "grid-p03.png"]
    assert all(Path(p).read_bytes()[:8] == PNG for p in paths)
    (pdf,) = lens_figures.prediction_grid(result, tmp_path / "grid.pdf", rows_per_page=32)
    assert Path(pdf).read_bytes()[:4] == b"%PDF"


def test_grid_of_very_long_pages_and_runs_stays_within_bounds():
    figures = lens_figures.prediction_figures(_result(500, 2), rows_per_page=500)  # labels thinned to fit
    figures += lens_figures.prediction_figures(_result(2, 400))  # cells too narrow for text: colours only
    try:
        labels = [label.get_text() for label in figures[0].axes[0].get_yticklabels()]
        assert 100 <= len(labels) < 500 and labels[:2] == [cell_text(VOCAB[0], 16), cell_text(VOCAB[2], 16)]
        assert not figures[1].axes[0].texts and "too many steps" in figures[1].axes[-1].get_ylabel()
        assert all(w <= 120 and h <= 60 for w, h in (fig.get_size_inches() for fig in figures))
        assert _integer_ticks(figures[1].axes[0])[-1] <= 399
    finally:
        _close(figures)
    with pytest.raises(lens_figures.LoopscopeError, match="rows_per_page"):
        lens_figures.prediction_figures(_result(3, 2), rows_per_page=0)


def test_short_grid_is_one_png(tmp_path):
    (path,) = lens_figures.prediction_grid(_result(10, 3), tmp_path / "g.png", title="a $title$")
    assert Path(path).read_bytes()[:8] == PNG and Path(path).stat().st_size > 1000


@pytest.mark.parametrize("zeros", ["clip", "drop"])
def test_kl_heatmap_pages_with_integer_ticks(tmp_path, zeros):
    result = _result(70, 65)
    figures = lens_figures.kl_figures(result, zeros=zeros, rows_per_page=32)
    try:
        assert len(figures) == 3
        for fig in figures:
            assert _integer_ticks(fig.axes[0])[0] == 0
        assert "KL" in figures[0].axes[-1].get_ylabel() and "zeros" in figures[0].axes[-1].get_ylabel()
    finally:
        _close(figures)
    paths = lens_figures.kl_heatmap(result, tmp_path / "kl.png", zeros=zeros, rows_per_page=32)
    assert [Path(p).name for p in paths] == ["kl-p01.png", "kl-p02.png", "kl-p03.png"]
    assert all(Path(p).read_bytes()[:8] == PNG for p in paths)


def test_kl_heatmap_of_a_short_run(tmp_path):
    result = _result(10, 3, short=2, texts=False)
    figures = lens_figures.kl_figures(result)
    try:
        assert _integer_ticks(figures[0].axes[0]) == [0, 1, 2]
        assert [t.get_text() for t in figures[0].axes[0].get_yticklabels()][:3] == ["100", "101", "102"]
    finally:
        _close(figures)
    (path,) = lens_figures.kl_heatmap(result, tmp_path / "kl.svg")
    assert Path(path).read_bytes()[:5] == b"<?xml"
    with pytest.raises(lens_figures.LoopscopeError, match="zeros"):
        lens_figures.kl_figures(result, zeros="hide")


@pytest.mark.parametrize("shape", [(70, 65), (10, 3), (1, 1)])
def test_settling_histogram_has_integer_bins(tmp_path, shape):
    result = _result(*shape, short=min(shape[0], 5))
    fig = lens_figures.settling_figure(result)
    try:
        ax = fig.axes[0]
        ticks = _integer_ticks(ax)
        values = result.settling_iteration
        assert ticks and values.min() <= min(ticks) and max(ticks) <= values.max()
        assert len(ticks) == 1 or set(np.diff(ticks)) <= {1, 2, 5, 10}
        heights = [p.get_height() for p in ax.patches]
        assert sum(heights) == shape[0]
        widths = {round(p.get_width(), 9) for p in ax.patches}
        assert widths == {1.0}
        assert ax.patches[0].get_x() == values.min() - 0.5
    finally:
        plt.close(fig)
    (path,) = lens_figures.settling_histogram(result, tmp_path / "s.png")
    assert Path(path).read_bytes()[:8] == PNG


def test_step_axis_is_in_iterations_only_when_every_token_holds_the_same():
    """A step stride of 4: slots hold iterations 0, 4, 8; a token that exited at 6 holds 6 in slot 2, so the axis
    can only say stored step; when all tokens agree, its ticks are the iterations."""
    result = _result(4, 3, short=0)
    result.step_stride = 4
    result.iterations = np.array([[0, 4, 8]] * 3 + [[0, 4, 6]])
    figures = lens_figures.kl_figures(result) + lens_figures.prediction_figures(result)
    try:
        for fig in figures:
            ax = fig.axes[0]
            assert ax.get_xlabel().startswith("Stored step: s0, then 1 in 4 iterations")
            assert [label.get_text() for label in ax.get_xticklabels()] == ["0", "1", "2"]
    finally:
        _close(figures)
    assert list(result.settling_iteration) == [int(result.iterations[t, k]) for t, k in enumerate(result.settling)]
    result.iterations = np.array([[0, 4, 8]] * 4)
    figures = lens_figures.kl_figures(result)
    try:
        ax = figures[0].axes[0]
        assert ax.get_xlabel() == lens_figures.ITERATIONS
        assert [label.get_text() for label in ax.get_xticklabels()] == ["0", "4", "8"]
    finally:
        _close(figures)


def test_figure_paths_are_checked_before_drawing(tmp_path):
    result = _result(3, 2)
    with pytest.raises(lens_figures.LoopscopeError, match="png"):
        lens_figures.prediction_grid(result, tmp_path / "grid.jpg")
    with pytest.raises(lens_figures.LoopscopeError, match="does not exist"):
        lens_figures.kl_heatmap(result, tmp_path / "nowhere" / "kl.png")


def test_cli_draws_the_grid_and_its_two_siblings(tmp_path):
    from loopscope.cli.lens import draw_lens

    paths = draw_lens(_result(10, 3), tmp_path / "lens.svg", "cap.h5, run 0")
    assert [Path(p).name for p in paths] == ["lens.svg", "lens_kl.svg", "lens_settling.svg"]
    assert all(Path(p).read_bytes()[:5] == b"<?xml" for p in paths)


# ---- the command ---------------------------------------------------------------------------------------------------


def _fails(args, *needles):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output, result.output
    return result.output


def test_cli_lens_bad_input_is_one_line(tmp_path):
    missing = tmp_path / "missing.h5"
    empty = tmp_path / "empty_model"
    empty.mkdir()
    _fails(["lens", missing, "--model", MODEL_DIR, "--out", tmp_path / "x.csv"], "no such file")
    _fails(["lens", missing, "--model", tmp_path / "nowhere", "--out", tmp_path / "x.csv"], "nowhere", "no such")
    _fails(["lens", missing, "--model", empty, "--out", tmp_path / "x.csv"], "config.json")
    (empty / "config.json").write_text("{}")
    _fails(["lens", missing, "--model", empty, "--out", tmp_path / "x.csv"], "weights")
    _fails(["lens", missing, "--model", MODEL_DIR, "--kind", "tuned", "--out", tmp_path / "x.csv"], "--kind tuned")
    _fails(["lens", missing, "--model", MODEL_DIR, "--out", tmp_path / "x.txt"], ".csv")
    _fails(["lens", missing, "--model", MODEL_DIR, "--out", tmp_path / "no" / "x.png"], "does not exist")
    _fails(["lens", missing, "--model", MODEL_DIR, "--top-k", "0", "--out", tmp_path / "x.csv"], "--top-k")


def test_lens_help_loads_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom loopscope.cli.app import app\n"
        "r = CliRunner().invoke(app, ['lens', '--help'])\nassert r.exit_code == 0 and '--model' in r.output\n"
        "print(sorted(m for m in sys.modules if m == 'torch'))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, short: its capture, heatmap and prediction grid (the lens of the shipped model)."""
    return run_demo(tmp_path_factory.mktemp("demo"), steps=8, max_new_tokens=2)


def test_demo_writes_the_prediction_grid(demo):
    assert demo.predictions == [demo.capture.parent / "predictions.png"]
    assert demo.predictions[0].read_bytes()[:8] == PNG


def test_cli_lens_on_the_demo_capture(demo, tmp_path):
    import loopscope

    runner = CliRunner()
    table = tmp_path / "lens.csv"
    result = runner.invoke(app, ["lens", str(demo.capture), "--model", str(MODEL_DIR), "--out", str(table)])
    assert result.exit_code == 0, result.output
    assert str(table) in result.output.replace("\n", "")
    with loopscope.open(demo.capture) as capture:
        expected = int(np.sum(capture.runs[0].steps_of(None) + 1))
    with open(table, newline="") as handle:
        rows = list(csv.reader(handle))  # a predicted "\n" is a quoted line break inside its cell
    assert rows[0][:4] == ["run", "loop", "kind", "token_index"] and len(rows) == expected + 1
    assert not (tmp_path / "lens.csv.partial").exists()
    columns = {name: i for i, name in enumerate(rows[0])}
    for row in rows[1:]:  # --top-k 5 (the default): five ids and probabilities, the first one the top-1
        ids, probs = row[columns["topk_ids"]].split(), [float(p) for p in row[columns["topk_probs"]].split()]
        assert len(ids) == len(probs) == 5 and ids[0] == row[columns["top1_id"]]
        assert probs == sorted(probs, reverse=True) and float(row[columns["top1_prob"]]) == probs[0]
    three = tmp_path / "lens3.csv"
    args = ["lens", str(demo.capture), "--model", str(MODEL_DIR), "--top-k", "3", "--out", str(three)]
    assert runner.invoke(app, args).exit_code == 0
    with open(three, newline="") as handle:
        kept = [row[columns["topk_ids"]].split() for row in list(csv.reader(handle))[1:]]
    assert kept == [row[columns["topk_ids"]].split()[:3] for row in rows[1:]]
    figure = tmp_path / "lens.png"
    args = ["lens", str(demo.capture), "--model", str(MODEL_DIR), "--top-k", "2", "--out", str(figure)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    written = [tmp_path / name for name in ("lens.png", "lens_kl.png", "lens_settling.png")]
    assert all(str(path) in result.output.replace("\n", "") for path in written)
    assert all(path.read_bytes()[:8] == PNG for path in written)


def test_cli_lens_run_out_of_range(demo, tmp_path):
    args = ["lens", demo.capture, "--model", MODEL_DIR, "--run", "7", "--out", tmp_path / "x.csv"]
    _fails(args, "no run 7")
    assert not (tmp_path / "x.csv").exists()
