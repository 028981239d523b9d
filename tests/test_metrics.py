"""Offline measures on real captures of the reference model, checked against direct numpy on the whole array."""

from __future__ import annotations

import csv
import dataclasses
import tracemalloc

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import METRICS, convergence, figures, token_metrics, trajectory_pca
from loopscope.analysis.measures import UPDATE_METRICS, block_measures
from loopscope.analysis.metrics import METRIC_HELP
from loopscope.cli.app import app
from loopscope.errors import LoopscopeError
from loopscope.models.demo import PROMPT as DEMO_PROMPT
from loopscope.models.demo import build_demo_model

PROMPT = "Tokens settle at different speeds."
RTOL = 1e-5  # every measure against float64 arithmetic on the same states (float32 states are measured in float32)


@pytest.fixture
def capture_path(reference_model, tokenizer, tmp_path):
    """Run 0: generate at 6 steps; run 1: forward at 4 steps; run 2: forward at 12 steps over run 1's tokens."""
    path = tmp_path / "cap.h5"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with loopscope.attach(reference_model, path, tokenizer=tokenizer):
        torch.manual_seed(0)
        reference_model.generate(ids, num_steps=6, max_new_tokens=3, do_sample=False)
        with torch.no_grad():
            reference_model(ids, num_steps=4)
            reference_model(ids, num_steps=12)
    return path


def _direct(states: np.ndarray, steps: np.ndarray, f, star=None) -> dict[str, np.ndarray]:
    """Every measure from the full [T, K, H] array, written the obvious way, token by token."""
    x = f(states.astype(np.float64))
    n_tokens, n_slots, _ = x.shape
    out = {name: np.full((n_tokens, n_slots), np.nan) for name in METRICS}
    for t in range(n_tokens):
        s_star = x[t, steps[t]] if star is None else star[t]
        for k in range(steps[t] + 1):
            diff = x[t, k] - s_star
            out["distance"][t, k] = np.sqrt(diff @ diff)
            out["relative_distance"][t, k] = np.sqrt(diff @ diff) / np.sqrt(s_star @ s_star)
            out["norm"][t, k] = np.sqrt(x[t, k] @ x[t, k])
            out["cosine"][t, k] = x[t, k] @ s_star / (np.sqrt(x[t, k] @ x[t, k]) * np.sqrt(s_star @ s_star))
            if k:
                step = x[t, k] - x[t, k - 1]
                out["step_delta"][t, k] = np.sqrt(step @ step)
            if k >= 2 and (x[t, k - 1] != x[t, k - 2]).any():  # NaN where the earlier update is zero
                before = x[t, k - 1] - x[t, k - 2]
                out["contraction"][t, k] = np.sqrt(step @ step) / np.sqrt(before @ before)
                if (step != 0).any():
                    out["update_cosine"][t, k] = step @ before / (np.sqrt(step @ step) * np.sqrt(before @ before))
    return out


def _assert_metrics_equal(got, want):
    for name in METRICS:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=0, err_msg=name)
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(want[name]), err_msg=name)


@pytest.mark.parametrize("space", ["state", "readout"])
def test_every_metric_matches_direct_numpy(capture_path, space):
    with loopscope.open(capture_path) as capture:
        f = (lambda x: x) if space == "state" else capture.readout
        for run in capture.runs:
            got = token_metrics(run, space=space)
            assert got.space == space and got.reference == "final"
            _assert_metrics_equal(got, _direct(run.states(), run.num_steps, f))
            np.testing.assert_array_equal(convergence(run, space=space), got.distance)
            assert np.all(got.distance[np.arange(run.num_tokens), run.num_steps] == 0)


def test_reference_run_of_more_iterations(capture_path):
    """s* from a longer run over the same tokens, as the paper's 128-iteration reference."""
    with loopscope.open(capture_path) as capture:
        short, long = capture.runs[1], capture.runs[2]
        star = capture.readout(long.states(step=12))
        want = _direct(short.states(), short.num_steps, capture.readout, star)
        for reference in (2, long, str(capture_path) + ":2"):
            got = token_metrics(short, reference=reference)
            _assert_metrics_equal(got, want)
            assert "12 steps" in got.reference
        # run 2 holds only the generate run's prompt: a reference shorter than the run, named as such
        with pytest.raises(LoopscopeError, match="the reference must"):
            token_metrics(capture.runs[0], reference=2)


def test_a_reference_file_run_counts_back_from_the_last_as_run_does(capture_path, tmp_path):
    """``FILE:-1`` is the file's last run, as ``--run -1`` is (it was refused as a file that does not exist); past
    the first run, one line says so."""
    with loopscope.open(capture_path) as capture:
        short = capture.runs[1]
        want = token_metrics(short, reference=2)
        got = token_metrics(short, reference=f"{capture_path}:-1")
        _assert_metrics_equal(got, {name: want[name] for name in METRICS})
        assert got.reference == want.reference
        with pytest.raises(LoopscopeError, match=r"has 3 complete run\(s\); run -4 counts back too far"):
            token_metrics(short, reference=f"{capture_path}:-4")
    command = ["convergence", str(capture_path), "--run", "1", "--reference", f"{capture_path}:-1"]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["plot", str(capture_path), "--run", "1", "--reference", f"{capture_path}:-4"])
    assert result.exit_code == 1 and "counts back too far" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_reference_in_another_file_and_longer_sequence(capture_path, reference_model, tokenizer, tmp_path):
    """A reference file whose run covers the prompt plus more tokens is accepted (prefix match)."""
    other = tmp_path / "ref.h5"
    ids = tokenizer(PROMPT + " And more.", return_tensors="pt").input_ids
    with loopscope.attach(reference_model, other):
        with torch.no_grad():
            reference_model(ids, num_steps=16)
    with loopscope.open(capture_path) as capture, loopscope.open(other) as ref:
        short = capture.runs[1]
        star = capture.readout(ref.runs[0].states(step=16)[: short.num_tokens])
        want = _direct(short.states(), short.num_steps, capture.readout, star)
        got = token_metrics(short, reference=str(other))
        _assert_metrics_equal(got, want)
        assert got.reference.startswith("ref.h5:0")
        for bad in ("final2", str(tmp_path / "missing.h5"), 3.5):
            with pytest.raises(LoopscopeError):
                token_metrics(short, reference=bad)
        with pytest.raises(LoopscopeError, match="has no run 9; its complete runs are 0-2"):
            token_metrics(short, reference=9)


def test_a_reference_of_another_model_with_the_same_width_is_refused(
    capture_path, new_reference_model, tokenizer, tmp_path
):
    """Another checkpoint of the same architecture (here: its final norm scaled) stores another readout norm; each
    side was read out by its own, so identical states once measured 4.0 apart at s*. It is refused in one line, as
    merge refuses it; a bf16-rounded copy of the same norm (a bf16 capture of the same model) is not."""
    other_model = new_reference_model()
    with torch.no_grad():
        other_model.transformer.ln_f.weight.mul_(1.5)
    other = tmp_path / "other.h5"
    with loopscope.attach(other_model, other), torch.no_grad():
        other_model(tokenizer(PROMPT, return_tensors="pt").input_ids, num_steps=4)
    with loopscope.open(capture_path) as capture:
        with pytest.raises(LoopscopeError, match="captured with another readout norm"):
            token_metrics(capture.runs[1], reference=f"{other}:0")
    command = ["convergence", str(capture_path), "--run", "1", "--reference", f"{other}:0"]
    result = CliRunner().invoke(app, [*command, "--out", str(tmp_path / "m.csv")])
    assert result.exit_code == 1 and "another readout norm" in result.output
    assert len(result.output.strip().splitlines()) == 1
    with loopscope.open(capture_path) as capture, loopscope.open(other) as ref:
        weight = torch.tensor(capture.readout.weight).bfloat16().float().numpy()
        rounded = dataclasses.replace(capture.readout, weight=weight)
        assert capture.readout.same_as(rounded, rounded=True)
        assert not capture.readout.same_as(ref.readout, rounded=True)


def test_convergence_steps_follow_their_definition(capture_path):
    with loopscope.open(capture_path) as capture:
        run = capture.runs[2]
        m = token_metrics(run, reference=2)
        for tol in (1e-3, 1e-2, 1e-1, 1.0):
            got = m.convergence_steps(tol)
            for t, n in enumerate(run.num_steps):
                values = m.relative_distance[t, : n + 1]
                want = next((k for k in range(n + 1) if np.all(values[k:] <= tol)), -1)
                assert got[t] == want, (tol, t)
        assert np.all(m.convergence_steps(0.0) == run.num_steps)  # only s* itself is within 0
        against_longer = token_metrics(capture.runs[1], reference=2).convergence_steps(1e-9)
        assert np.all(against_longer == -1)  # 4 iterations never reach the 12-iteration state


def test_csv_holds_every_valid_cell(capture_path, tmp_path):
    out = tmp_path / "m.csv"
    with loopscope.open(capture_path) as capture:
        run = capture.runs[0]
        m = token_metrics(run)
        rows = m.to_csv(out, tol=0.05)
    with open(out, newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert rows == len(table) == int(np.sum(run.num_steps + 1))
    converged = m.convergence_steps(0.05)
    for row in table:
        t, k = int(row["token_index"]), int(row["step"])
        assert row["token"] == run.tokens[t] and int(row["token_id"]) == run.token_ids[t]
        assert int(row["converged_at"]) == converged[t]
        for name in METRICS:
            value = m[name][t, k]
            assert (row[name] == "") if np.isnan(value) else float(row[name]) == value


def test_streamed_analysis_of_a_capture_larger_than_the_chunk_cache(reference_model, tmp_path):
    """512 tokens x 65 steps x 64 floats (8.5 MB; 17 MB as float64) analysed with a 1 MB block budget."""
    path = tmp_path / "long.h5"
    ids = torch.randint(3, 300, (1, 512), generator=torch.Generator().manual_seed(0))
    with loopscope.attach(reference_model, path):
        with torch.no_grad():
            reference_model(ids, num_steps=64)
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        stored = run.dataset().size * 4
        assert stored > 8 << 20
        whole = token_metrics(run, block_bytes=1 << 40)  # one block: the whole array at once
        tracemalloc.start()
        streamed = token_metrics(run, block_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        outputs = 5 * run.num_tokens * 65 * 8
        assert peak < outputs + (4 << 20), peak  # outputs plus a few MB, not the 17 MB float64 array
        for name in METRICS:
            np.testing.assert_array_equal(streamed[name], whole[name])


def test_pca_projections_preserve_the_trajectory_geometry(capture_path):
    with loopscope.open(capture_path) as capture:
        run = capture.runs[2]
        x = capture.readout(run.states(token=3))  # [13, H]
        (full,) = trajectory_pca(run, [3], n_components=x.shape[0])
        centred = x - x.mean(axis=0)
        np.testing.assert_allclose(full.centre, x.mean(axis=0))
        # with every component kept, projection is a rotation: pairwise distances are unchanged
        d_x = np.linalg.norm(centred[:, None] - centred[None], axis=-1)
        d_p = np.linalg.norm(full.projections[:, None] - full.projections[None], axis=-1)
        np.testing.assert_allclose(d_p, d_x, atol=1e-9)
        assert np.isclose(full.explained.sum(), 1.0) and np.all(np.diff(full.explained) <= 1e-12)
        (six,) = trajectory_pca(run, [3])
        np.testing.assert_allclose(six.projections, full.projections[:, :6], atol=1e-9)
        shared = trajectory_pca(run, [1, 3, 5], basis="shared")
        assert [t.token for t in shared] == [1, 3, 5] and shared[0].projections.shape == (13, 6)
        assert shared[0].explained.sum() <= 1 + 1e-12
        with pytest.raises(LoopscopeError, match="out of range"):
            trajectory_pca(run, [99])


@pytest.fixture(scope="module")
def converged_captures(tmp_path_factory):
    """The demo model 64 iterations deep over its prompt, stored as float32, bfloat16 and float16: distances to s*
    shrink to ~1e-7 of its norm, and the first states are nearly orthogonal to it (cosines near 0)."""
    model, tokenizer = build_demo_model()
    ids = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    folder = tmp_path_factory.mktemp("converged")
    paths = {}
    for dtype in ("float32", "bfloat16", "float16"):
        paths[dtype] = folder / f"{dtype}.h5"
        with loopscope.attach(model, paths[dtype], dtype=dtype), torch.no_grad():
            torch.manual_seed(0)
            model(ids, num_steps=64)
    return paths


@pytest.mark.parametrize("space", ["state", "readout"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_measures_keep_float64_precision_near_convergence(converged_captures, dtype, space):
    """Every measure within RTOL of float64 arithmetic, also where the distance to s* is a millionth of its norm
    (where float32 readout states, or norms expanded as |a|^2 + |b|^2 - 2ab, lose every digit) and where the
    cosine is near 0 (where a float32 dot product loses its relative precision)."""
    with loopscope.open(converged_captures[dtype]) as capture:
        run = capture.runs[0]
        assert run.logical_dtype() == dtype
        got = token_metrics(run, space=space)
        want = _direct(run.states(), run.num_steps, (lambda x: x) if space == "state" else capture.readout)
    relative = want["relative_distance"]
    assert np.sum((relative > 0) & (relative < 1e-5)) >= 20, "no tokens near convergence: the check would be void"
    assert np.nanmin(np.abs(want["cosine"])) < 0.01
    for name in METRICS:
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=0, err_msg=name)


def test_float32_measures_fall_back_to_float64_past_its_range(converged_captures):
    """Captured states scaled so their squares overflow float32 (norms ~1e21) are measured as float64 would."""
    with loopscope.open(converged_captures["float32"]) as capture:
        run = capture.runs[0]
        states = run.states() * np.float32(1e20)
    assert np.isfinite(states).all()
    got = block_measures(states, run.num_steps)
    want = block_measures(states.astype(np.float64), run.num_steps)
    for name in METRICS:
        assert not np.isinf(got[name]).any(), name
        np.testing.assert_allclose(got[name], want[name], rtol=RTOL, atol=0, err_msg=name)


def test_a_cosine_near_zero_keeps_its_relative_precision(converged_captures):
    """s* turned orthogonal to each token's first state: cosines of ~1e-9 still match float64 arithmetic within
    RTOL, which a dot product summed in float32 (absolute error ~1e-8) would miss by orders of magnitude."""
    with loopscope.open(converged_captures["float32"]) as capture:
        run = capture.runs[0]
        states = run.states()
    first, last = states[:, 0].astype(np.float64), states[np.arange(run.num_tokens), run.num_steps].astype(np.float64)
    along = np.sum(last * first, axis=1) / np.sum(first * first, axis=1)
    star = (last - along[:, None] * first).astype(np.float32)
    got = block_measures(states, run.num_steps, star)
    want = _direct(states, run.num_steps, lambda x: x, star.astype(np.float64))
    assert np.max(np.abs(want["cosine"][:, 0])) < 1e-6
    np.testing.assert_allclose(got["cosine"], want["cosine"], rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    "measures",
    [
        ("distance",),
        ("cosine",),
        ("step_delta",),
        ("step_delta", "relative_distance"),
        ("norm",),
        ("update_cosine",),
        ("contraction",),
        ("contraction", "distance"),
    ],
)
def test_a_subset_of_measures_equals_the_same_measures_of_the_full_pass(capture_path, measures):
    """Fewer measures cost less arithmetic and give the same numbers; the others are None, and asking for one of
    them (or writing the CSV, which needs all) says which option computes it."""
    with loopscope.open(capture_path) as capture:
        run = capture.runs[0]
        full = token_metrics(run)
        some = token_metrics(run, measures=measures)
    assert some.measures == tuple(name for name in METRICS if name in measures)
    for name in METRICS:
        if name in measures:
            np.testing.assert_array_equal(some[name], full[name], err_msg=name)
        else:
            assert getattr(some, name) is None
            with pytest.raises(LoopscopeError, match=f"{name} was not computed"):
                some[name]
    assert some.nonfinite_tokens().size == 0  # step 0 has no step delta, by definition: that is not a NaN state
    with pytest.raises(LoopscopeError, match="to_csv writes every measure"):
        some.to_csv(capture_path.with_suffix(".csv"))
    states = run.states()
    states[2, 1] = np.inf  # a token that blew up at step 1
    flags = block_measures(states, run.num_steps, measures=measures)["nonfinite"]
    np.testing.assert_array_equal(np.nonzero(flags)[0], [2])


def test_unknown_or_no_measures_are_one_line_errors(capture_path):
    with loopscope.open(capture_path) as capture:
        for bad in (("distance", "speed"), ()):
            with pytest.raises(LoopscopeError, match="name one or more of distance"):
                token_metrics(capture.runs[0], measures=bad)


def test_a_cosine_alone_still_falls_back_to_float64_past_float32s_range(converged_captures):
    """The cosine's norms overflow float32 for these states though no norm was asked for: the block is measured
    again in float64, as the full pass does."""
    with loopscope.open(converged_captures["float32"]) as capture:
        run = capture.runs[0]
        states = run.states() * np.float32(1e20)
    got = block_measures(states, run.num_steps, measures=("cosine",))
    want = block_measures(states.astype(np.float64), run.num_steps)
    assert list(got) == ["cosine", "nonfinite"] and not got["nonfinite"].any()
    np.testing.assert_allclose(got["cosine"], want["cosine"], rtol=RTOL, atol=0)


def test_a_reference_of_another_state_size_is_a_one_line_error(capture_path, tokenizer, tmp_path):
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config

    register()
    torch.manual_seed(0)
    narrow = RavenReferenceForCausalLM(
        tiny_config(vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer), n_embd=32, n_heads=2, head_dim=16)
    ).eval()
    other = tmp_path / "narrow.h5"
    with loopscope.attach(narrow, other), torch.no_grad():
        narrow(tokenizer(PROMPT, return_tensors="pt").input_ids, num_steps=8)
    with loopscope.open(capture_path) as capture:
        for space in ("state", "readout"):
            with pytest.raises(LoopscopeError, match="has states of size 32, run 1 64; use a reference captured"):
                token_metrics(capture.run(1), reference=f"{other}:0", space=space)


def test_reader_arguments_of_the_wrong_type_are_named(capture_path):
    """A caller's mistake is said to be one, not reported as a damaged file."""
    with loopscope.open(capture_path) as capture:
        run = capture.runs[0]
        for kwargs, pattern in [
            (dict(step=2.0), "step=2.0 must be an integer"),
            (dict(token="3"), "token='3' must be an integer"),
            (dict(loop=1), "loop=1 must be a loop's name"),
            (dict(token=99), "token 99 out of range"),
        ]:
            with pytest.raises(LoopscopeError, match=pattern):
                run.states(**kwargs)
        with pytest.raises(LoopscopeError, match="a run index is an integer"):
            capture.run("0")


# ---- the geometry of the updates u_k = s_k - s_(k-1) ----------------------------------------------------------------
def _plain_updates(x: np.ndarray, last: np.ndarray) -> dict[str, np.ndarray]:
    """update_cosine and contraction of [T, K, H] float64 states, the whole array at once (``_direct`` loops)."""
    u = np.diff(x, axis=1)
    now, before = u[:, 1:], u[:, :-1]
    size_now, size_before = np.linalg.norm(now, axis=2), np.linalg.norm(before, axis=2)
    ran = np.arange(2, x.shape[1])[None, :] <= last[:, None]
    with np.errstate(all="ignore"):
        cosine = np.sum(now * before, axis=2) / (size_now * size_before)
        ratio = size_now / size_before
    nan2 = np.full((len(x), 2), np.nan)
    return {
        "update_cosine": np.hstack([nan2, np.where(ran & (size_now > 0) & (size_before > 0), cosine, np.nan)]),
        "contraction": np.hstack([nan2, np.where(ran & (size_before > 0), ratio, np.nan)]),
    }


def _assert_updates_equal(got, want):
    for name in UPDATE_METRICS:
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(want[name]), err_msg=name)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=0, err_msg=name)
        assert np.isnan(got[name][:, :2]).all() and np.isfinite(got[name]).any(), name


@pytest.mark.parametrize("space", ["state", "readout"])
def test_update_measures_match_plain_numpy(capture_path, converged_captures, space):
    """Within 1e-6 of float64 numpy on the reference model's states (and the demo model's, near convergence), NaN
    exactly at k < 2 and past each token's last step, also for last steps cut short (0, 1, 2, ...)."""
    for path in (capture_path, converged_captures["float32"]):
        with loopscope.open(path) as capture:
            f = (lambda x: x) if space == "state" else capture.readout
            for run in capture.runs:
                states, exact = run.states(), f(run.states().astype(np.float64))
                _assert_updates_equal(token_metrics(run, space=space), _plain_updates(exact, run.num_steps))
                shorter = np.minimum(run.num_steps, np.arange(run.num_tokens) % (run.num_steps.max() + 1))
                got = block_measures(f(states), shorter, measures=UPDATE_METRICS)
                assert np.isnan(got["contraction"][shorter < 2]).all()
                _assert_updates_equal(got, _plain_updates(exact, shorter))


class _Contract(torch.nn.Module):
    def __init__(self, star: torch.Tensor, a: float):
        super().__init__()
        self.star, self.a = star, a

    def forward(self, x):
        return self.star + self.a * (x - self.star)


class _LinearLoop(torch.nn.Module):
    """s_k = s* + A^k (s_0 - s*) with A = a I (``loop="block"``): every update is ``a`` times the one before. Small
    integers and a = +-1/2 keep every state exact in float32, so the expected values are exact too."""

    def __init__(self, a: float, steps: int = 10, hidden: int = 8):
        super().__init__()
        self.star = torch.arange(hidden, dtype=torch.float32) - 3
        self.block, self.steps = _Contract(self.star, a), steps

    def forward(self, input_ids):
        pattern = torch.tensor([1.0, -2.0, 3.0, 0.0, 5.0, -1.0, 2.0, 4.0])[: self.star.numel()]
        x = self.star + (input_ids[..., None] + 1).float() * pattern  # s_0, another distance from s* per token
        for _ in range(self.steps):
            x = self.block(x)
        return x


@pytest.mark.parametrize("a", [0.5, -0.5])
def test_a_linear_loop_contracts_by_its_factor(tmp_path, a):
    """contraction = |a| at every k >= 2, and successive updates are parallel (a > 0) or opposite (a < 0)."""
    path = tmp_path / "linear.h5"
    model = _LinearLoop(a)
    with loopscope.attach(model, path, loop="block"), torch.no_grad():
        model(input_ids=torch.arange(4)[None, :])
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        m = token_metrics(run, space="state")
        states = run.states()
    assert states.shape == (4, 11, 8) and np.all(run.num_steps == 10)
    np.testing.assert_array_equal(states[:, -1] - model.star.numpy(), (states[:, 0] - model.star.numpy()) * a**10)
    assert np.isnan(m.contraction[:, :2]).all() and np.isnan(m.update_cosine[:, :2]).all()
    np.testing.assert_allclose(m.contraction[:, 2:], abs(a), rtol=1e-12, atol=0)
    np.testing.assert_allclose(m.update_cosine[:, 2:], np.sign(a), rtol=1e-6, atol=0)
    assert not m.nonfinite.any()


def test_csv_appends_the_update_measures_and_curves_draw_them(capture_path, tmp_path, monkeypatch):
    """The older columns keep their places (converged_at last of them); ``plot --kind curves`` draws a contraction
    on a log axis around its level 1, an update cosine on a linear one from -1 to 1."""
    with loopscope.open(capture_path) as capture:
        m = token_metrics(capture.runs[0])
    m.to_csv(tmp_path / "m.csv")
    with open(tmp_path / "m.csv", newline="", encoding="utf-8") as handle:
        header, *rows = list(csv.reader(handle))
    older = ["distance", "relative_distance", "step_delta", "cosine", "norm", "converged_at"]
    assert header[8:] == [*older, "update_cosine", "contraction", "loop"]
    step_1, step_2 = (dict(zip(header, row)) for row in rows[1:3])  # token 0
    assert step_1["contraction"] == step_1["update_cosine"] == ""
    assert (
        float(step_2["contraction"]) == m.contraction[0, 2] and float(step_2["update_cosine"]) == m.update_cosine[0, 2]
    )
    drawn = {}
    original = figures.curves
    monkeypatch.setattr(figures, "curves", lambda series, out, **kw: drawn.update(kw) or original(series, out, **kw))
    for metric, log, ylim in (("contraction", True, None), ("update_cosine", False, (-1.05, 1.05))):
        out = tmp_path / f"{metric}.png"
        result = CliRunner().invoke(
            app, ["plot", str(capture_path), "--kind", "curves", "--metric", metric, "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (drawn["log"], drawn["ylim"], drawn["ylabel"]) == (log, ylim, METRIC_HELP[metric])


def test_a_reference_is_matched_by_position_and_labelled_in_iterations(reference_model, tmp_path):
    """A run that stored some tokens only (``tokens=[2, 4]``) takes s* from the reference's tokens at its positions,
    not from the reference's first tokens (a prompt of one repeated token made the ids agree, and the distances were
    silently wrong); a reference with a step stride is labelled with its iterations, not its stored steps."""
    ids = torch.full((1, 6), 5)
    with torch.no_grad():
        with loopscope.attach(reference_model, tmp_path / "run.h5", tokens=[2, 4]):
            reference_model(ids, num_steps=6)
        with loopscope.attach(reference_model, tmp_path / "ref.h5", step_stride=3):
            reference_model(ids, num_steps=20)
    with loopscope.open(tmp_path / "run.h5") as capture, loopscope.open(tmp_path / "ref.h5") as reference:
        run, ref = capture.runs[0], reference.runs[0]
        assert run.positions.tolist() == [2, 4]
        star = ref.states(step=int(ref.steps_of(None)[0]))[[2, 4]]  # the last stored step holds iteration 20
        got = token_metrics(run, reference=f"{tmp_path / 'ref.h5'}:0", space="state")
        want = _direct(run.states(), run.steps_of(None), lambda s: s, star.astype(np.float64))
        np.testing.assert_allclose(got.distance, want["distance"], rtol=1e-5, equal_nan=True)
        assert got.reference == "ref.h5:0 (20 steps)"
    with loopscope.attach(reference_model, tmp_path / "short.h5") as _, torch.no_grad():
        reference_model(ids[:, :4], num_steps=6)
    missing = "has 4 token.s. and run 0 has 2, none at position 4"
    with loopscope.open(tmp_path / "run.h5") as capture, pytest.raises(LoopscopeError, match=missing):
        token_metrics(capture.runs[0], reference=f"{tmp_path / 'short.h5'}:0")


def test_the_convergence_table_counts_iterations_with_a_step_stride(reference_model, tmp_path):
    """The summary table said "7-7" steps and a convergence step in stored slots for 20 iterations kept 1 in 3,
    where its own CSV and ``info`` count iterations."""
    with loopscope.attach(reference_model, tmp_path / "s.h5", step_stride=3), torch.no_grad():
        reference_model(torch.arange(3, 30).unsqueeze(0), num_steps=20)
    command = ["convergence", str(tmp_path / "s.h5"), "--out", str(tmp_path / "m.csv")]
    result = CliRunner().invoke(app, command, env={"COLUMNS": "200"})  # a wide table: no cell wraps
    assert result.exit_code == 0, result.output
    with open(tmp_path / "m.csv") as f:
        converged = [int(row["converged_at"]) for row in csv.DictReader(f) if row["step"] == "0"]
    row = " ".join(result.output.split())
    assert "20-20 (1 in 3 kept)" in row and f"│ {np.median(converged):g} │" in row


def test_a_token_whose_states_are_all_zero_has_converged_not_never(tmp_path):
    """A pad token of a batch run by Dory, HRM-Text or Inkling-2 has all-zero states at every step: its distance
    to s* is 0 throughout, so its relative distance is 0, not 0 / 0 (it was NaN, and counted as never converged);
    a state away from an all-zero s* is infinitely far, relatively."""
    rng = np.random.default_rng(0)
    states = np.zeros((3, 4, 8))
    states[1] = rng.normal(size=(4, 8))
    states[2, :3] = rng.normal(size=(3, 8))  # s* (its last state) is zero, earlier states are not
    for dtype in (np.float64, np.float32):
        m = block_measures(states.astype(dtype), np.array([3, 3, 3]))
        np.testing.assert_array_equal(m["relative_distance"][0], 0.0)
        assert np.isinf(m["relative_distance"][2, :3]).all() and m["relative_distance"][2, 3] == 0
        assert np.isfinite(m["relative_distance"][1]).all()


def test_a_left_padded_row_that_stored_some_tokens_is_measured_against_the_same_tokens(new_hrm_text_model, tmp_path):
    """A padded row's pads repeat positions, so s* was looked up by order, from the pads on: a tokens="generated"
    run of the padded row was refused as 'another prompt'. The reference's attended tokens have positions of their
    own; the same computation captured whole gives each stored token its own final state as s*."""
    model = new_hrm_text_model()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # row 0 left-padded
    full, generated = tmp_path / "full.h5", tmp_path / "gen.h5"
    for path, tokens in ((full, "all"), (generated, "generated")):
        with loopscope.attach(model, path, tokens=tokens):
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with loopscope.open(generated) as capture:
        for row in (0, 1):
            m = token_metrics(capture.runs[row], reference=f"{full}:{row}")
            last = capture.runs[row].num_steps
            np.testing.assert_array_equal(m.distance[np.arange(len(last)), last], 0.0)
