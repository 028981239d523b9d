"""The `loopscope` command on real captures of the reference model (typer's CliRunner)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.cli.app import app


@pytest.fixture(scope="module")
def capture_path(two_run_capture, tmp_path_factory):
    """Run 0: generate at 6 steps; run 1: forward at 4 steps. Shared by the module: tests only read it."""
    return two_run_capture(tmp_path_factory.mktemp("cli") / "cap.h5", "Tokens settle at different speeds.", 6, 3, 4)


def test_cli_info_and_plot(capture_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["info", str(capture_path)])
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "forward" in result.output
    out = tmp_path / "fig.png"
    result = runner.invoke(app, ["plot", str(capture_path), "--run", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


def _ok(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(
    "kind, extra, suffix",
    [
        ("heatmap", [], ".pdf"),
        ("heatmap", [], ".svg"),
        ("heatmap", ["--zeros", "drop"], ".png"),
        ("heatmap", ["--reference", "1", "--run", "1"], ".png"),
        ("pca", [], ".png"),
        ("pca", ["--tokens", "0,2", "--basis", "shared"], ".png"),
        ("curves", ["--run", "0", "--run", "1", "--metric", "step_delta"], ".png"),
        ("exits", [], ".png"),
        ("compare", ["--other", "1"], ".png"),
    ],
)
def test_cli_plot_every_kind_and_format(capture_path, tmp_path, kind, extra, suffix):
    out = tmp_path / f"fig{suffix}"
    output = _ok(["plot", capture_path, "--kind", kind, "--out", out, *extra])
    assert str(out) in output.replace("\n", "")
    assert out.read_bytes()[:5].startswith(MAGIC[suffix])


def test_heatmap_pages_for_long_sequences(tmp_path):
    from loopscope.analysis import figures

    d = np.random.default_rng(0).random((300, 9)) + 0.1
    d[:, -1] = 0
    pngs = figures.heatmap(d, tmp_path / "h.png", rows_per_page=128)
    assert [p.rsplit("/", 1)[-1] for p in pngs] == ["h-p01.png", "h-p02.png", "h-p03.png"]
    (pdf,) = figures.heatmap(d, tmp_path / "h.pdf", rows_per_page=128, zeros="drop")
    assert open(pdf, "rb").read().count(b"/Type /Page\n") + open(pdf, "rb").read().count(b"/Type /Page ") >= 3


def test_cli_convergence_csv(capture_path, tmp_path):
    out = tmp_path / "m.csv"
    output = _ok(["convergence", capture_path, "--out", out, "--tol", "0.05"])
    assert "converged at" in output
    with loopscope.open(capture_path) as capture:
        expected = sum(int(np.sum(r.num_steps + 1)) for r in capture.runs)
    lines = out.read_text().splitlines()
    assert lines[0].startswith("run,token_index,position,token_id,token,step,iteration,num_steps,distance")
    assert len(lines) == expected + 1
    assert {line.split(",")[0] for line in lines[1:]} == {"0", "1"}


@pytest.mark.parametrize("dtype", ["keep", "bfloat16"])
def test_cli_export_npz_and_safetensors(reference_model, prompt_ids, tmp_path, dtype):
    from safetensors import safe_open

    path = tmp_path / "cap.h5"
    with loopscope.attach(reference_model, path, dtype=dtype):
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=5)
            reference_model(prompt_ids[:, :4], num_steps=3)
    _ok(["export", path, "--format", "npz"])
    _ok(["export", path, "--format", "safetensors", "--out", tmp_path / "one.safetensors", "--run", "1"])
    with loopscope.open(path) as capture, np.load(tmp_path / "cap.npz") as npz:
        for run in capture.runs:
            prefix = f"runs/{run.name}"
            np.testing.assert_array_equal(npz[f"{prefix}/loops/core/states"], run.states())  # bf16 widened exactly
            np.testing.assert_array_equal(npz[f"{prefix}/loops/core/num_steps"], run.num_steps)
            np.testing.assert_array_equal(npz[f"{prefix}/token_ids"], run.token_ids)
        assert '"format": "loopscope-capture"' in str(npz["meta"])
        run = capture.runs[1]
        with safe_open(tmp_path / "one.safetensors", framework="pt") as st:
            assert set(st.keys()) == {
                f"runs/{run.name}/{k}"
                for k in (
                    "token_ids",
                    "attention_mask",
                    "positions",
                    "forward_index",
                    "loops/core/num_steps",
                    "loops/core/states",
                )
            }
            states = st.get_tensor(f"runs/{run.name}/loops/core/states")
            assert states.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
            np.testing.assert_array_equal(states.float().numpy(), run.states())
            assert "tokens" in st.metadata()["loopscope"]


def test_cli_capture_a_saved_model(reference_model, tokenizer, tmp_path):
    model_dir = tmp_path / "tiny-looped"
    reference_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("First prompt here.\n\nA second, longer prompt follows.\n")
    out = tmp_path / "cli.h5"
    output = _ok(
        [
            "capture",
            model_dir,
            "--prompt",
            "Hello loop.",
            "--prompt-file",
            prompts,
            "--steps",
            "5",
            "--max-new-tokens",
            "3",
            "--out",
            out,
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]
    )
    assert "3 prompt(s)" in output
    # the same capture by hand: same model, same seed per prompt -> the same tokens and states, bit for bit
    by_hand = tmp_path / "hand.h5"
    with loopscope.attach(reference_model, by_hand, tokenizer=tokenizer):
        for text in ("Hello loop.", "First prompt here.", "A second, longer prompt follows."):
            torch.manual_seed(0)
            ids = tokenizer(text, return_tensors="pt").input_ids
            reference_model.generate(ids, num_steps=5, max_new_tokens=3, do_sample=False)
    with loopscope.open(out) as got, loopscope.open(by_hand) as want:
        assert len(got.runs) == len(want.runs) == 3
        for a, b in zip(got.runs, want.runs):
            np.testing.assert_array_equal(a.token_ids, b.token_ids)
            np.testing.assert_array_equal(a.num_steps, np.full(a.num_tokens, 5))
            np.testing.assert_array_equal(a.states(), b.states())
        assert got.meta["name_or_path"] == str(model_dir)
    forward_only = tmp_path / "fwd.h5"
    _ok(["capture", model_dir, "--prompt", "Just one forward.", "--out", forward_only])
    with loopscope.open(forward_only) as capture:
        assert capture.runs[0].attrs["call"] == "forward"
    # adaptive exit, generated tokens only, every 2nd iteration: the same as attach() with those options
    adaptive = tmp_path / "adaptive.h5"
    _ok(
        [
            "capture",
            model_dir,
            "--prompt",
            "Hello loop.",
            "--steps",
            "12",
            "--max-new-tokens",
            "4",
            "--out",
            adaptive,
            "--criterion",
            "kl",
            "--exit-threshold",
            "1e-4",
            "--tokens",
            "generated",
            "--step-stride",
            "2",
        ]
    )
    by_hand = tmp_path / "adaptive-hand.h5"
    with loopscope.attach(reference_model, by_hand, tokens="generated", step_stride=2):
        torch.manual_seed(0)
        ids = tokenizer("Hello loop.", return_tensors="pt").input_ids
        reference_model.generate(
            ids, num_steps=12, max_new_tokens=4, do_sample=False, criterion="kl", exit_threshold=1e-4
        )
    with loopscope.open(adaptive) as got, loopscope.open(by_hand) as want:
        (a,), (b,) = got.runs, want.runs
        assert a.num_tokens == 3 and a.step_stride == 2
        np.testing.assert_array_equal(a.iterations_of(), b.iterations_of())
        np.testing.assert_array_equal(a.states(), b.states())


def test_cli_errors_are_one_line(capture_path, tmp_path, reference_model, tokenizer):
    model_dir = tmp_path / "m"
    reference_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    not_h5 = tmp_path / "text.h5"
    not_h5.write_text("hello")
    cap = str(capture_path)
    cases = [
        ["info", str(tmp_path / "missing.h5")],
        ["info", str(not_h5)],
        ["plot", cap, "--run", "7", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--out", str(tmp_path / "x.jpg")],
        ["plot", cap, "--out", str(tmp_path / "nodir" / "x.png")],
        ["plot", cap, "--kind", "violin", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--kind", "compare", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--kind", "compare", "--other", "0", "--out", str(tmp_path / "x.png"), "--reference", "9"],
        ["plot", cap, "--reference", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--kind", "pca", "--tokens", "a,b", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--kind", "pca", "--tokens", "500", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--kind", "curves", "--metric", "speed", "--out", str(tmp_path / "x.png")],
        ["plot", cap, "--space", "pca", "--out", str(tmp_path / "x.png")],
        ["convergence", cap, "--out", str(tmp_path / "x.txt")],
        ["convergence", cap, "--out", str(tmp_path / "x.csv"), "--tol", "nan"],
        ["plot", cap, "--kind", "exits", "--tol", "-1", "--out", str(tmp_path / "x.png")],
        ["convergence", cap, "--out", str(tmp_path / "x.csv"), "--reference", "1"],
        ["export", cap, "--format", "parquet"],
        ["export", cap, "--format", "npz", "--out", str(tmp_path / "x.safetensors")],
        ["export", cap, "--format", "safetensors", "--out", str(tmp_path / "x.npz")],
        ["export", cap, "--format", "npz", "--out", str(tmp_path / "nodir" / "x.npz")],
        ["capture", str(tmp_path / "no-model"), "--prompt", "hi", "--out", str(tmp_path / "c.h5")],
        ["capture", str(tmp_path), "--prompt", "hi", "--out", str(tmp_path / "c.h5")],  # a folder, no config.json
        ["capture", str(model_dir), "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt", " ", "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt-file", str(tmp_path / "none.txt"), "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt", "hi", "--steps", "0", "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt", "hi", "--device", "cuda:7", "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt", "hi", "--dtype", "int8", "--out", str(tmp_path / "c.h5")],
        ["capture", str(model_dir), "--prompt", "hi", "--out", cap],
    ]
    for args in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        assert "Traceback" not in result.output
        assert result.output.strip().startswith("error:"), (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, (args, result.output)


def test_capture_refusals_are_one_line_and_leave_no_file(tmp_path):
    """A prompt past the model's context, an exit criterion the model does not know, a negative threshold: one line
    each (was: a traceback from inside the model), and no empty capture left for the next try to trip over."""
    from loopscope.models.demo import MODEL_DIR  # a saved model with a tokenizer and a 256-token context

    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(" ".join(["word"] * 700) + "\n")
    out = tmp_path / "c.h5"
    cases = [
        (["--prompt-file", long_prompt], "past the model's context (block_size=256); shorten it"),
        (["--prompt", "Hi", "--max-new-tokens", "300"], " + 300 new, past the model's context"),
        (
            ["--prompt", "Hi", "--criterion", "bogus", "--exit-threshold", "1", "--max-new-tokens", "3"],
            "ValueError: unknown exit criterion 'bogus'",
        ),
        (["--prompt", "Hi", "--criterion", "kl", "--exit-threshold", "-1", "--max-new-tokens", "3"], "give a number"),
        (["--prompt", "Hi", "--tokens", "5:2"], "--tokens 5:2: use all, prompt, generated, a slice"),
        (["--prompt", "Hi", "--tokens", "1,-3"], "token indices >= 0"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["capture", str(MODEL_DIR), *map(str, args), "--out", str(out)])
        assert result.exit_code == 1, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, result.output)
        assert not out.exists() and not (tmp_path / "c.h5.runs").exists(), args
    kept = tmp_path / "kept.h5"
    kept.write_bytes(b"a user's file")
    result = CliRunner().invoke(app, ["capture", str(MODEL_DIR), "--prompt", "Hi", "--out", str(kept)])
    assert result.exit_code == 1 and kept.read_bytes() == b"a user's file"  # refused, and never removed


@pytest.mark.parametrize(
    "tokens, kept", [("0:4", [0, 1, 2, 3]), ("::3", None), ("1,3,5", [1, 3, 5]), ("2", [2]), ("prompt", None)]
)
def test_capture_tokens_option_takes_slices_and_indices(tmp_path, tokens, kept):
    from loopscope.models.demo import MODEL_DIR

    out = tmp_path / "t.h5"
    args = ["capture", str(MODEL_DIR), "--prompt", "Twelve ravens flew over the harbour at dawn."]
    result = CliRunner().invoke(app, [*args, "--max-new-tokens", "2", "--tokens", tokens, "--out", str(out)])
    assert result.exit_code == 0, result.output
    with loopscope.open(out) as capture:
        positions = capture.runs[0].positions.tolist()
    every = list(range(positions[-1] + 1)) if tokens == "::3" else None
    if tokens == "::3":
        assert positions == every[::3] and len(positions) > 2
    elif tokens == "prompt":
        assert positions == list(range(len(positions))) and len(positions) > 5
    else:
        assert positions == kept


def test_cli_demo(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--steps", "12", "--max-new-tokens", "3"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "demo.h5").exists()
    assert (tmp_path / "d" / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    with loopscope.open(tmp_path / "d" / "demo.h5") as capture:
        run = capture.runs[0]
        assert set(run.num_steps.tolist()) == {12}
        assert run.tokens is not None and len(run.tokens) == run.num_tokens


def test_cli_exits_and_curves_for_per_token_depth(reference_model, tokenizer, tmp_path):
    """Each decoded token runs its own number of iterations (set between forwards, as an adaptive exit does):
    the exits histogram counts those depths, and the measures stop at each token's own last step."""
    from transformers import LogitsProcessor, LogitsProcessorList

    steps, schedule = torch.tensor(4), iter([7, 2, 5, 3, 6])

    class NextDepth(LogitsProcessor):
        def __call__(self, input_ids, scores):
            steps.fill_(next(schedule))
            return scores

    path = tmp_path / "adaptive.h5"
    ids = tokenizer("Adaptive depth.", return_tensors="pt").input_ids
    with loopscope.attach(reference_model, path, tokenizer=tokenizer):
        reference_model.generate(
            ids, num_steps=steps, max_new_tokens=5, do_sample=False, logits_processor=LogitsProcessorList([NextDepth()])
        )
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        assert run.num_steps.tolist() == [4] * ids.shape[1] + [7, 2, 5, 3]
        d = loopscope.analysis.convergence(run)
        assert d.shape == (run.num_tokens, 8)
        assert np.isnan(d[-3, 3:]).all() and not np.isnan(d[-3, :3]).any()  # the 2-step token stops at step 2
    for kind in ("exits", "curves", "heatmap"):
        out = tmp_path / f"{kind}.png"
        _ok(["plot", path, "--kind", kind, "--out", out])
        assert out.read_bytes()[:4] == b"\x89PNG"


def test_info_shows_the_stride_and_the_signals(reference_model, prompt_ids, tmp_path):
    torch.manual_seed(0)
    with loopscope.attach(reference_model, tmp_path / "i.h5", step_stride=4):
        reference_model.generate(prompt_ids, max_new_tokens=2, num_steps=10, criterion="kl", exit_threshold=1e-4)
    result = CliRunner().invoke(app, ["info", str(tmp_path / "i.h5")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "(1 in 4 kept)" in result.output and "exit_value" in result.output


def test_plot_a_signal(reference_model, prompt_ids, tmp_path):
    torch.manual_seed(0)
    with loopscope.attach(reference_model, tmp_path / "g.h5"):
        reference_model.generate(prompt_ids, max_new_tokens=3, num_steps=10, criterion="kl", exit_threshold=1e-4)
    out = tmp_path / "signal.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "g.h5"), "--kind", "signal", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 10_000
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "g.h5"), "--kind", "signal", "--signal", "gate"])
    assert missing.exit_code == 1 and "no signal 'gate'" in missing.output and "exit_value" in missing.output


def test_a_capture_with_a_gap_in_its_run_numbers(new_reference_model, prompt_ids, tmp_path):
    """Run 1 cut short by an exception, then appended to: every command takes run numbers as `info` shows them
    (0 and 2), not positions in the list of complete runs (export once wrote run 3 for --run 1, silently)."""
    path = tmp_path / "gap.h5"
    model = new_reference_model()
    for number, steps in enumerate((4, 6, 3, 2)):
        with loopscope.attach(model, path, mode="w" if number == 0 else "a"), torch.no_grad():
            if number == 1:
                stop = model.transformer.core_block[-1].register_forward_hook(_interrupt_after(3))
                with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="closed the capture"):
                    model(prompt_ids, num_steps=steps)
                stop.remove()
            else:
                model(prompt_ids[:, : 3 + number], num_steps=steps)
    with loopscope.open(path) as capture:
        assert [r.index for r in capture.runs] == [0, 2, 3]
        assert capture.run(2).num_tokens == 5 and capture.run(-1).index == 3
        with pytest.raises(loopscope.LoopscopeError, match="run 1 .* is incomplete .* complete runs are 0, 2-3"):
            capture.run(1)
        with pytest.raises(loopscope.LoopscopeError, match="has no run 7"):
            capture.run(7)
        want = capture.run(2).states()
    _ok(["export", path, "--format", "npz", "--run", "0", "--run", "2", "--out", tmp_path / "two.npz"])
    with np.load(tmp_path / "two.npz") as npz:
        assert {k.split("/")[1] for k in npz.files if k.startswith("runs/")} == {"000000", "000002"}
        np.testing.assert_array_equal(npz["runs/000002/loops/core/states"], want)
    _ok(["export", path, "--format", "npz", "--out", tmp_path / "all.npz"])
    _ok(["plot", path, "--run", "2", "--out", tmp_path / "two.png"])
    result = CliRunner().invoke(app, ["plot", str(path), "--run", "1", "--out", str(tmp_path / "one.png")])
    assert result.exit_code == 1 and "incomplete" in result.output and result.output.count("\n") == 1


def _interrupt_after(calls: int):
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt

    return hook


def test_export_keeps_iterations_stride_and_signals(reference_model, prompt_ids, tmp_path):
    """With a step stride and an adaptive exit, the exported num_steps are the iterations stored in HDF5 (not
    the last stored step), the stride and the step-to-iteration map go along, and so do the signals."""
    import json

    path = tmp_path / "stride.h5"
    with loopscope.attach(reference_model, path, step_stride=3):
        torch.manual_seed(0)
        reference_model.generate(
            prompt_ids, num_steps=10, max_new_tokens=4, do_sample=False, criterion="latent-diff", exit_threshold=0.02
        )
    _ok(["export", path, "--format", "npz", "--out", tmp_path / "s.npz"])
    with loopscope.open(path) as capture, np.load(tmp_path / "s.npz") as npz:
        (run,) = capture.runs
        prefix = f"runs/{run.name}/loops/core"
        assert not np.array_equal(run.iterations_of(), run.steps_of(None))  # the check would be void otherwise
        np.testing.assert_array_equal(npz[f"{prefix}/num_steps"], run.iterations_of())
        np.testing.assert_array_equal(npz[f"{prefix}/step_iterations"], run.step_iterations())
        assert run.signal_names() == ["exit_value"]
        np.testing.assert_array_equal(npz[f"{prefix}/signals/exit_value"], run.signal("exit_value"))
        assert json.loads(str(npz["meta"]))["runs"][run.name]["step_stride"] == 3


def test_pca_skips_or_names_tokens_whose_states_blew_up(reference_model, prompt_ids, tmp_path):
    import h5py

    path = tmp_path / "blown.h5"
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(prompt_ids, num_steps=6)
    with loopscope.open(path) as capture:
        run_file = capture.runs[0].path
    with h5py.File(run_file, "a") as f:  # as a model that overflowed would have left them
        f["loops/core/states"][3, 4:] = np.inf
    output = _ok(["plot", path, "--kind", "pca", "--out", tmp_path / "pca.png"])  # default tokens: finite ones
    assert "token 3" in output and (tmp_path / "pca.png").exists()
    result = CliRunner().invoke(
        app, ["plot", str(path), "--kind", "pca", "--tokens", "3", "--out", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and "token 3 of run 0 has NaN or infinite states" in result.output
    assert result.output.count("\n") == 1


def test_default_pca_tokens_put_those_that_never_converge_last(capture_path):
    """Against a deeper reference some tokens never come within tol: they are the slowest, never the fastest."""
    from loopscope.analysis import token_metrics
    from loopscope.cli.plots import _typical_tokens

    with loopscope.open(capture_path) as capture:
        m = token_metrics(capture.run(1), reference=0)  # 4 steps against the generate run's 6
    last = m.relative_distance[np.arange(len(m.num_steps)), m.num_steps]
    tol = float(np.median(last))
    steps = m.convergence_steps(tol)
    assert (steps < 0).any() and (steps >= 0).any()
    fastest, *_, slowest = _typical_tokens(m, tol)
    assert steps[fastest] == steps[steps >= 0].min() and steps[slowest] == -1


def test_figures_of_a_step_stride_capture_label_stored_steps(reference_model, prompt_ids, tmp_path):
    """With step_stride the columns are stored steps, not iterations: the x axis says so."""
    import matplotlib

    path = tmp_path / "stride.h5"
    with loopscope.attach(reference_model, path, step_stride=3), torch.no_grad():
        reference_model(prompt_ids, num_steps=7)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        for kind in ("heatmap", "curves"):
            _ok(["plot", path, "--kind", kind, "--out", tmp_path / f"{kind}.svg"])
    for kind in ("heatmap", "curves"):
        text = (tmp_path / f"{kind}.svg").read_text()
        assert "Stored step: s0, then 1 in 3 iterations" in text and "Iterations at Test-Time" not in text


def test_a_convergence_table_that_fails_partway_leaves_no_file(reference_model, tokenizer, tmp_path):
    path = tmp_path / "three.h5"
    first, other = (tokenizer(t, return_tensors="pt").input_ids for t in ("Tokens settle.", "Something else here."))
    with loopscope.attach(reference_model, path), torch.no_grad():
        reference_model(first, num_steps=3)
        reference_model(first, num_steps=6)
        reference_model(other, num_steps=3)  # run 2: other tokens than the reference, run 1
    out = tmp_path / "table.csv"
    result = CliRunner().invoke(app, ["convergence", str(path), "--out", str(out), "--reference", "1"])
    assert result.exit_code == 1 and "covers other tokens" in result.output
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_a_warning_on_the_command_line_is_one_line_naming_no_source_file(capture_path, tmp_path):
    """A library warning during a command (here: a file named like an older page that is no figure, left in place)
    is printed as one "warning:" line, not Python's two lines quoting loopscope's own source."""
    from test_hostile_files import _child

    (tmp_path / "fig-p01.png").write_text("my notes, not a figure")
    code, out, err = _child("cli", "plot", capture_path, "--run", "1", "--out", tmp_path / "fig.png")
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("warning: left 1 file(s)"), out + err
    assert ".py:" not in err and "UserWarning" not in err and (tmp_path / "fig-p01.png").exists()


def _refused(args, needle):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and needle in result.output and "Traceback" not in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_a_run_given_twice_is_refused_by_every_command_that_takes_several(capture_path, tmp_path):
    """Measured, drawn or shown twice, a run would count double downstream (each CSV row twice): one line instead,
    whether the same number is repeated or a negative index names it again; nothing is written."""
    twice, alias = ["--run", "1", "--run", "1"], ["--run", "0", "--run", "-2"]
    for args in (
        ["convergence", capture_path, "--out", tmp_path / "m.csv"],
        ["plot", capture_path, "--kind", "curves", "--out", tmp_path / "c.png"],
        ["report", capture_path, "--out", tmp_path / "r.html"],
        ["export", capture_path, "--format", "npz", "--out", tmp_path / "e.npz"],
    ):
        _refused([*args, *twice], "--run 1 is given twice")
        _refused([*args, *alias], "--run 0 and --run -2 both name run 0")
    assert not any(tmp_path.iterdir())
    from loopscope.report import write_report

    with loopscope.open(capture_path) as capture, pytest.raises(loopscope.LoopscopeError, match="run 1 is given"):
        write_report(capture, tmp_path / "r.html", runs=[1, 1])


def test_pca_tokens_are_named_once_and_never_quietly_replaced(capture_path, tmp_path):
    """``--tokens 3,3`` (or 2 and -1 of a run whose last token is 2) would draw one trajectory twice, and
    ``--tokens ""`` silently drew the default tokens: both refused in one line. -1 is the last token (documented)."""
    from loopscope.analysis import trajectory_pca

    with loopscope.open(capture_path) as capture:
        n = capture.run(0).num_tokens
        with pytest.raises(loopscope.LoopscopeError, match="names a token twice"):
            trajectory_pca(capture.run(0), [1, 1 - n])
        with pytest.raises(loopscope.LoopscopeError, match=f"token {n} is out of range"):  # not "twice" (n % n)
            trajectory_pca(capture.run(0), [0, n])
    base = ["plot", capture_path, "--kind", "pca", "--out", tmp_path / "p.png", "--tokens"]
    _refused([*base, "1,1"], "--tokens 1,1: token 1 is given twice")
    _refused([*base, f"{n - 1},-1"], f"{n - 1} and -1 both name token {n - 1}")
    _refused([*base, ""], "--tokens '': give token indices")
    _refused([*base, " , "], "give token indices")
    assert not (tmp_path / "p.png").exists()
    _ok([*base, "0,-1"])
    import typer

    plot = typer.main.get_command(app).commands["plot"]  # type: ignore[attr-defined]
    assert any("--tokens" in p.opts and "negative: from the last" in p.help for p in plot.params)
