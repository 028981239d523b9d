"""The figures of `loopscope plot` on real captures: row labels, loops, ticks, labels that fit, compare, PCA colours,
the prompt line and the space named on the colour bar (the tiny reference model, and HRM-Text for two loops)."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import figures, token_metrics, trajectory_pca
from loopscope.analysis.figure_axes import PROMPT_NOTE, percent
from loopscope.cli.app import app


@pytest.fixture
def drawn(monkeypatch):
    """Every figure saved while the test runs, kept (and drawn) for the test to look at."""
    kept: list = []
    original = figures._save_pages

    def keep(plt, pages, out):
        kept.extend(pages)
        return original(plt, pages, out)

    monkeypatch.setattr(figures, "_save_pages", keep)
    return kept


def _plot(*args, code=0):
    result = CliRunner().invoke(app, ["plot", *[str(a) for a in args]])
    assert result.exit_code == code, result.output
    return result.output


def _left(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_yticklabels()]


def _right(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[1].get_yticklabels()]


def _colour_label(fig) -> str:
    return fig.axes[-1].get_ylabel().replace("\n", " ")


def _visible_ticks(axis) -> list[float]:
    low, high = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if low - 1e-9 <= t <= high + 1e-9]


@pytest.fixture(scope="module")
def plain_capture(new_reference_model, tmp_path_factory):
    """A capture made without a tokenizer: 11 tokens, 3 iterations, a forward."""
    path = tmp_path_factory.mktemp("plain") / "plain.h5"
    model = new_reference_model()
    ids = torch.arange(3, 14)[None, :]
    with loopscope.attach(model, path), torch.no_grad():
        model(ids, num_steps=3)
    return path


@pytest.fixture(scope="module")
def generated(two_run_capture, tmp_path_factory):
    """Run 0: generate() at 4 steps (prompt + 3 new tokens); run 1: a forward over the prompt at 6 steps."""
    return two_run_capture(tmp_path_factory.mktemp("gen") / "cap.h5", "Tokens settle at different speeds.", 4, 3, 6)


def test_paged_rows_keep_their_index_without_a_tokenizer(plain_capture, tmp_path, drawn):
    """Defect 1: the left axis restarted at 0 on every page while the right one showed the true positions."""
    with loopscope.open(plain_capture) as capture:
        run = capture.runs[0]
        assert run.tokens is None
        m = token_metrics(run, measures=("distance",))
        figures.heatmap(m.distance, tmp_path / "h.png", positions=run.positions, rows_per_page=4)
    assert len(drawn) == 3
    assert [_left(fig) for fig in drawn] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9", "10"]]
    assert [_right(fig) for fig in drawn][1] == ["4", "5", "6", "7"]
    assert drawn[0].axes[0].get_ylabel() == "Token (index in the run)"


def test_several_loops_are_named_in_titles_colour_bars_csv_and_a_note(hrm_capture, tmp_path, drawn):
    """Defect 2 (and 7: HRM-Text's readout is the identity, so its distances are in the state space)."""
    output = _plot(hrm_capture, "--out", tmp_path / "h.png")
    (note,) = [line for line in output.splitlines() if "--loop NAME" in line]
    assert "loops H, L" in note and "drawing H" in note
    fig = drawn.pop()
    assert "[loop H]" in fig.axes[0].get_title() and "[loop H]" in _colour_label(fig)
    assert "state space (the model has no readout norm)" in _colour_label(fig)
    assert "readout space" not in _colour_label(fig)
    output = _plot(hrm_capture, "--loop", "L", "--kind", "pca", "--out", tmp_path / "p.png")
    assert "--loop NAME" not in output
    fig = drawn.pop()
    assert "[loop L]" in fig._suptitle.get_text() and "[loop L]" in _colour_label(fig)
    for kind in ("exits", "curves"):
        _plot(hrm_capture, "--kind", kind, "--out", tmp_path / f"{kind}.png")
        assert "[loop H]" in drawn.pop().axes[0].get_title()
    result = CliRunner().invoke(app, ["convergence", str(hrm_capture), "--out", str(tmp_path / "m.csv"), "--loop", "L"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "m.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    assert header[-1] == "loop" and header[:2] == ["run", "token_index"]
    assert {row[-1] for row in rows} == {"L"} and "--loop NAME" not in result.output
    result = CliRunner().invoke(app, ["convergence", str(hrm_capture), "--out", str(tmp_path / "h.csv")])
    assert result.exit_code == 0 and "has loops H, L; measuring H (pick another with --loop NAME)" in result.output


def test_a_single_loop_is_not_named(generated, tmp_path, drawn):
    output = _plot(generated, "--run", "1", "--out", tmp_path / "h.png")
    assert "--loop" not in output
    fig = drawn.pop()
    assert "loop" not in fig.axes[0].get_title() and "readout space" in _colour_label(fig)


def _inside_canvas(fig) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas_of = FigureCanvasAgg(fig)  # a closed figure has lost its pyplot canvas
    canvas_of.draw()
    renderer = canvas_of.get_renderer()
    canvas = fig.bbox
    for text in [fig.axes[-1].yaxis.label, *[ax.title for ax in fig.axes], *[ax.xaxis.label for ax in fig.axes]]:
        if not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        assert canvas.x0 - 1 <= box.x0 and box.x1 <= canvas.x1 + 1, text.get_text()
        assert canvas.y0 - 1 <= box.y0 and box.y1 <= canvas.y1 + 1, text.get_text()
    tight = fig.get_tightbbox(renderer)  # inches
    width, height = fig.get_size_inches()
    assert tight.x0 >= -0.02 and tight.y0 >= -0.02 and tight.x1 <= width + 0.02 and tight.y1 <= height + 0.02


@pytest.mark.parametrize("zeros", ["clip", "drop"])
def test_short_figures_have_integer_ticks_and_labels_that_fit(plain_capture, tmp_path, drawn, zeros):
    """Defect 3: 11 tokens, 3 iterations: no -0.5 / 0.5 ticks, and the long colour-bar label inside the canvas."""
    _plot(plain_capture, "--zeros", zeros, "--out", tmp_path / "h.png")
    _plot(plain_capture, "--kind", "exits", "--out", tmp_path / "e.png")
    _plot(plain_capture, "--kind", "curves", "--out", tmp_path / "c.png")
    heat, exits, curves = drawn
    assert "zeros" in _colour_label(heat)
    _inside_canvas(heat)
    for axis in (heat.axes[0].xaxis, exits.axes[0].xaxis, exits.axes[0].yaxis, curves.axes[0].xaxis):
        ticks = _visible_ticks(axis)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    d = np.array([[3.0, 2.0, 0.0]])  # one token, one tiny page
    figures.heatmap(d, tmp_path / "one.png", zeros=zeros)
    _inside_canvas(drawn[-1])


def test_compare_titles_rows_positions_and_itself(two_run_capture, tmp_path, drawn):
    """Defect 4: two files of the same name, runs of different length, and a run compared with itself."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = two_run_capture(tmp_path / "a" / "demo.h5", "Short one.", 3, 2, 3)
    b = two_run_capture(tmp_path / "b" / "demo.h5", "A somewhat longer prompt here.", 3, 2, 5)
    _plot(a, "--kind", "compare", "--run", "1", "--other", f"{b}:1", "--out", tmp_path / "c.png")
    fig = drawn.pop()
    left, right = fig.axes[:2]
    assert str(tmp_path / "a" / "demo.h5") in left.get_title() and str(tmp_path / "b" / "demo.h5") in right.get_title()
    with loopscope.open(a) as ca, loopscope.open(b) as cb:
        short, long = ca.run(1).num_tokens, cb.run(1).num_tokens
        long_positions = [str(int(p)) for p in cb.run(1).positions]
    assert short < long
    assert left.get_ylim() == right.get_ylim() == (long - 0.5, -0.5)  # rows line up, the shorter padded
    positions = {ax.get_ylabel(): ax for ax in fig.axes[2:4]}
    assert set(positions) == {"Position"}
    assert [t.get_text() for t in fig.axes[3].get_yticklabels()] == long_positions
    assert len(fig.axes[2].get_yticklabels()) == short
    output = _plot(a, "--kind", "compare", "--run", "1", "--other", "1", "--out", tmp_path / "x.png", code=1)
    assert "itself" in output and len(output.strip().splitlines()) == 1


def test_pca_colours_steps_on_a_log_scale_and_prints_small_variances(generated, tmp_path, drawn):
    """Defect 5: early steps differ in colour, and explained variance keeps its digits."""
    assert (percent(0.0004), percent(1e-6), percent(0.0), percent(0.123), percent(0.05)) == (
        "0.04%",
        "<0.01%",
        "0%",
        "12%",
        "5.0%",
    )
    with loopscope.open(generated) as capture:
        trajectories = trajectory_pca(capture.runs[1], [0, 3], space="state")
    figures.pca_trajectories(trajectories, tmp_path / "p.png")
    fig = drawn.pop()
    scatter = fig.axes[0].collections[0]
    shade = scatter.norm(np.array([1.0, 2.0, 6.0]))
    assert shade[1] - shade[0] > 0.1 and shade[2] == pytest.approx(1.0)
    label = re.compile(r"^PC\d \((<0\.01|\d+(\.\d+)?)%\)$")
    assert all(label.match(ax.get_xlabel()) for ax in fig.axes[:3] if ax.get_xlabel())
    ticks = fig.axes[-1].get_yticks()
    assert all(float(t).is_integer() for t in ticks)


def test_prompt_line_and_visible_leading_spaces(generated, tmp_path, drawn):
    """Defect 6: the prompt/generated boundary is drawn and named; ' s' shows as '␣s'."""
    _plot(generated, "--out", tmp_path / "h.png")
    fig = drawn.pop()
    with loopscope.open(generated) as capture:
        run = capture.runs[0]
        prompt = int(np.sum(run.forward_index == 0))
        assert 0 < prompt < run.num_tokens
    lines = [line for line in fig.axes[0].lines if list(line.get_ydata()) == [prompt - 0.5, prompt - 0.5]]
    assert lines and fig.axes[0].get_title().endswith(f"\n({PROMPT_NOTE})")  # a line break, not an escape
    assert "␣s" in _left(fig)
    _plot(generated, "--run", "1", "--out", tmp_path / "f.png")  # a forward has no generated tokens: no line
    assert PROMPT_NOTE not in drawn.pop().axes[0].get_title()


def test_a_state_space_heatmap_of_the_api_names_the_missing_readout(generated, tmp_path, drawn):
    """Defect 7, through the API: a readout of kind identity is the state space."""
    d = np.array([[2.0, 1.0, 0.0]] * 3)
    figures.heatmap(d, tmp_path / "h.png", readout="identity")
    assert "state space (the model has no readout norm)" in _colour_label(drawn.pop())
    figures.heatmap(d, tmp_path / "h.png", readout="rmsnorm")
    assert "(readout space" in _colour_label(drawn.pop())


def test_convergence_of_a_run_of_several_loops_says_which_it_measured(hrm_capture):
    """The bare array of ``convergence()`` cannot name its loop: a warning does, and ``loop=`` silences it."""
    import warnings

    from loopscope.analysis import convergence

    with loopscope.open(hrm_capture) as capture:
        run = capture.runs[0]
        with pytest.warns(UserWarning, match=r"has loops H, L; convergence\(\) measured H \(pass loop= for another\)"):
            first = convergence(run)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(convergence(run, loop="H"), first)
            assert convergence(run, loop="L").shape[1] != first.shape[1]


def test_compare_draws_both_panels_zeros_at_the_shared_floor(tmp_path, drawn):
    """--zeros clip: each panel's s* cells (distance 0) sit at the floor the one colour bar names, not at the
    panel's own smallest distance (run A's 1e-2 would read as 'not converged' beside run B's 1e-6); that floor is a
    decade below the smallest distance of both, so s* has a colour of its own."""
    a = np.array([[10.0, 1.0, 1e-2, 0.0], [10.0, 2.0, 2e-2, 0.0]])
    b = np.array([[10.0, 1e-3, 1e-6, 0.0], [10.0, 1e-3, 1e-6, 0.0]])
    figures.compare(a, b, tmp_path / "c.png", zeros="clip")
    fig = drawn.pop()
    for ax in [ax for ax in fig.axes if ax.images][:2]:
        image = ax.images[0]
        assert image.norm.vmin == pytest.approx(1e-7)
        np.testing.assert_allclose(image.get_array()[:, 3], image.norm.vmin)


def test_exits_says_how_many_tokens_never_converged_and_names_s_star(generated, tmp_path, drawn):
    """Tokens that never get within tol have no bar: the title counts them (it once dropped them silently, and a
    run where none converged drew an empty frame) and names s*."""
    figures.exits(np.array([3, -1, 5, -1]), tmp_path / "e.png", never="never converged within tol=1e-07")
    fig = drawn.pop()
    assert fig.axes[0].get_title().endswith("\n2 of 4 tokens never converged within tol=1e-07 (not drawn)")
    assert sum(patch.get_height() for patch in fig.axes[0].patches) == 2
    _plot(generated, "--run", "1", "--kind", "exits", "--reference", "0", "--tol", "1e-12", "--out", tmp_path / "n.png")
    fig = drawn.pop()
    with loopscope.open(generated) as capture:
        n = capture.run(1).num_tokens
    title = fig.axes[0].get_title().split("\n")
    assert title[1] == "s* = run 0 (4 steps)" and title[2] == f"{n} of {n} tokens never converged within tol=1e-12"
    assert [t.get_text() for t in fig.axes[0].texts] == [title[2]]  # said in the frame, not an empty one
    _plot(generated, "--run", "1", "--kind", "exits", "--out", tmp_path / "f.png")  # s* = final: every token does
    assert drawn.pop().axes[0].get_title().split("\n")[1:] == ["s* = final"]


def test_pca_of_a_strided_capture_colours_and_names_real_iterations(new_reference_model, tmp_path, drawn):
    """step_stride=4 over 10 iterations stores s_0, s_4, s_8, s_10: colours, colour bar and the star's name are
    those iterations, not the rows 0..3; tokens whose rows hold different iterations are coloured by stored step."""
    from loopscope.analysis.pca import TrajectoryPCA

    model = new_reference_model()
    with loopscope.attach(model, tmp_path / "s.h5", step_stride=4), torch.no_grad():
        model(torch.arange(3, 9)[None, :], num_steps=10)
    with loopscope.open(tmp_path / "s.h5") as capture:
        trajectories = trajectory_pca(capture.runs[0], [0, 2], space="state")
    figures.pca_trajectories(trajectories, tmp_path / "p.png")
    fig = drawn.pop()
    assert list(fig.axes[0].collections[0].get_array()) == [0, 4, 8, 10]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["s_0", "s_10"]
    assert _colour_label(fig).startswith("Iteration") and fig.axes[-1].get_yticklabels()[-1].get_text() == "10"
    early = TrajectoryPCA(1, "x", trajectories[1].projections[:3], trajectories[1].explained, None, np.array([0, 4, 6]))
    figures.pca_trajectories([trajectories[0], early], tmp_path / "q.png")
    fig = drawn.pop()
    assert list(fig.axes[0].collections[0].get_array()) == [0, 1, 2, 3] and _colour_label(fig).startswith("Stored step")
    legend = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert legend == ["s_0", "s_10", "s_0", "s_6"]


def test_a_figure_over_an_earlier_one_leaves_none_of_its_pages(tmp_path):
    """3 pages, then 2, then one file, then 2 again to one name: only the last figure's files remain. Files of such
    names that are no figure of this format (a capture, a link) are left, and a warning says so."""
    import warnings

    out = tmp_path / "fig.png"
    d = np.array([[2.0, 1.0, 0.0]] * 6)

    def draw(rows_per_page):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figures.heatmap(d, out, rows_per_page=rows_per_page)
        return sorted(p.name for p in tmp_path.iterdir()), [str(w.message) for w in caught]

    assert draw(2)[0] == ["fig-p01.png", "fig-p02.png", "fig-p03.png"]
    assert draw(3) == (["fig-p01.png", "fig-p02.png"], [])
    assert draw(6) == (["fig.png"], [])
    assert draw(3) == (["fig-p01.png", "fig-p02.png"], [])
    keep = {"fig-p3.png": b"x", "fig-p03.png.bak": b"x", "other-p03.png": b"x", "fig-p04.svg": b"<svg"}
    for name, data in keep.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "fig-p05.png").write_bytes(b"\x89HDF\r\n\x1a\n")  # a capture named like a page
    (tmp_path / "fig-p06.png").symlink_to(tmp_path / "fig-p01.png")
    names, messages = draw(6)
    assert names == sorted(["fig.png", "fig-p05.png", "fig-p06.png", *keep])
    assert len(messages) == 1 and "left 2 file(s) named like pages of" in messages[0]


def test_a_prompt_ending_with_a_page_is_marked_on_the_next_page_only(tmp_path, drawn):
    """4 prompt rows, pages of 4: the line belongs to page 2, where generated tokens begin (at its top), not to
    page 1's lower edge as well."""
    figures.heatmap(np.array([[2.0, 1.0, 0.0]] * 8), tmp_path / "h.png", rows_per_page=4, prompt=4)
    first, second = drawn
    assert PROMPT_NOTE not in first.axes[0].get_title() and not first.axes[0].lines
    assert second.axes[0].get_title().endswith(f"\n({PROMPT_NOTE})")
    assert [list(line.get_ydata()) for line in second.axes[0].lines] == [[-0.5, -0.5]]


def test_s_star_has_a_colour_of_its_own_when_distances_span_less_than_a_decade(tmp_path, drawn):
    """One iteration: s0 is ~28 from s*, s* is 0. The zeros once sat at the smallest distance (27.6), the colour of
    every other cell; now a decade below it."""
    d = np.array([[27.6, 0.0], [28.6, 0.0]])
    figures.heatmap(d, tmp_path / "h.png", zeros="clip")
    image = [ax for ax in drawn.pop().axes if ax.images][0].images[0]
    colours = image.cmap(image.norm(image.get_array()))
    assert image.norm.vmin == pytest.approx(2.76)
    assert not np.allclose(colours[:, 1], colours[:, 0], atol=0.05)
