"""Bad input gets one clear line (CLI) or a typed LoopscopeError (API), never a traceback from h5py or numpy.

Real files throughout: damaged copies of a real capture, foreign HDF5 files, and a hypothesis-driven fuzz that
flips, zeroes and truncates bytes of the index and run files.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from capture_copies import copy_capture as _copy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from package_files import package_sources
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import token_metrics, trajectory_pca
from loopscope.cli.app import app
from loopscope.errors import CaptureFileError, LoopscopeError

PACKAGE_ROOT = Path(loopscope.__file__).parent


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output, result.output
    if result.exit_code:
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines()[-1].startswith("error:"), result.output
    return result.exit_code, result.output


def _assert_one_line_error(path: Path, pattern: str, *, run: int | None = None):
    """The API raises a CaptureFileError matching ``pattern``; info/plot print it as one line, exit code 1."""
    with pytest.raises(CaptureFileError, match=pattern):
        with loopscope.open(path) as capture:
            chosen = capture.runs if run is None else [capture.run(run)]
            for r in chosen:
                token_metrics(r)
    args = ["plot", path, "--out", path.parent / "x.png"] + ([] if run is None else ["--run", run])
    code, output = _cli(*args)
    assert code == 1 and re.search(pattern, output) and len(output.strip().splitlines()) == 1, output


def test_not_hdf5_foreign_and_newer_files(tmp_path, pristine):
    text = tmp_path / "notes.h5"
    text.write_text("just text")
    _assert_one_line_error(text, "not a readable HDF5 file")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["data"] = np.arange(3)
    _assert_one_line_error(foreign, "not a loopscope capture")
    newer = _copy(pristine, tmp_path)
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 99
    _assert_one_line_error(newer, "newer than this loopscope reads.*upgrade")
    _assert_one_line_error(tmp_path / "absent.h5", "no such file")
    run_file = Path(str(pristine) + ".runs") / "000000.h5"
    _assert_one_line_error(run_file, "one run's file; open the capture's index")
    (tmp_path / "run").mkdir()
    newer_run = _copy(pristine, tmp_path / "run")
    with h5py.File(str(newer_run) + ".runs/000000.h5", "a") as f:
        f.attrs["format_version"] = 99  # a run laid out by a later loopscope is not read as this one's
    _assert_one_line_error(newer_run, "run format version 99, newer than this loopscope reads.*upgrade", run=0)


@pytest.mark.parametrize(
    "target, pattern",
    [
        ("runs", "cannot list the run folder .*Permission denied.*check its permissions"),
        ("index", "cap.h5 is not a readable HDF5 file .*Permission denied"),
    ],
)
def test_unreadable_captures_are_one_line(tmp_path, pristine, target, pattern):
    """Without read permission on the run folder or the index, every command says so in one line and exit code 1
    (was: a PermissionError traceback; for the index, click's usage box and exit code 2)."""
    capture = _copy(pristine, tmp_path)
    locked = str(capture) + ".runs" if target == "runs" else str(capture)
    mode = os.stat(locked).st_mode
    os.chmod(locked, 0)
    try:
        if os.geteuid() != 0:
            _assert_one_line_error(capture, pattern)
            return
        # root reads anything: run the command without the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root and setpriv (util-linux) is not installed")
        command = [sys.executable, "-c", "from loopscope.cli.app import main; main()", "info", str(capture)]
        drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        result = subprocess.run(drop + command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert re.search(pattern, result.stderr), result.stderr
    finally:
        os.chmod(locked, mode)


def test_truncated_and_damaged_files(tmp_path, pristine):
    truncated_index = _copy(pristine, tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path)
    with open(truncated_index, "r+b") as f:
        f.truncate(64)
    _assert_one_line_error(truncated_index, "not a readable HDF5 file")

    (tmp_path / "b").mkdir()
    truncated_run = _copy(pristine, tmp_path / "b")
    with open(str(truncated_run) + ".runs/000001.h5", "r+b") as f:
        f.truncate(os.path.getsize(f.name) // 2)
    _assert_one_line_error(truncated_run, "000001.h5 .*(damaged|unreadable)", run=1)
    code, output = _cli("info", truncated_run)  # the other run is still listed
    assert code == 0 and "damaged" in output
    with loopscope.open(truncated_run) as capture:
        assert capture.runs[0].states().shape[1] == 4  # run 0 is untouched

    (tmp_path / "c").mkdir()
    missing = _copy(pristine, tmp_path / "c")
    with h5py.File(str(missing) + ".runs/000000.h5", "a") as f:
        del f["positions"]
    _assert_one_line_error(missing, "no 'positions'", run=0)

    (tmp_path / "d").mkdir()
    wrong_steps = _copy(pristine, tmp_path / "d")
    with h5py.File(str(wrong_steps) + ".runs/000000.h5", "a") as f:
        f["loops/core/num_steps"][0] = 1000
    _assert_one_line_error(wrong_steps, "num_steps ranges", run=0)


def test_nan_and_inf_states_are_analysed_and_flagged(reference_model, prompt_ids, tmp_path):
    with torch.no_grad():
        reference_model.transformer.core_block[0].mlp.fc.weight[0, 0] = float("inf")
    path = tmp_path / "blown.h5"
    with loopscope.attach(reference_model, path):
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=3)
    with loopscope.open(path) as capture:
        m = token_metrics(capture.runs[0])
        assert m.nonfinite_tokens().size == prompt_ids.shape[1]
    code, output = _cli("plot", path, "--out", tmp_path / "blown.png")
    assert code == 0 and "NaN or infinite" in output and (tmp_path / "blown.png").exists()
    code, output = _cli("convergence", path, "--out", tmp_path / "blown.csv")
    assert code == 0
    for kind in ("curves", "exits"):  # nothing finite to label: no legend, so no matplotlib warning either
        code, output = _cli("plot", path, "--kind", kind, "--out", tmp_path / f"{kind}.png")
        assert code == 0 and "legend" not in output and output.count("warning:") == 1, output


def test_capture_paths_and_modes(reference_model, prompt_ids, tmp_path):
    with pytest.raises(LoopscopeError, match="does not exist; create it first"):
        loopscope.attach(reference_model, tmp_path / "no" / "such" / "dir.h5")
    with pytest.raises(LoopscopeError, match="is a directory"):
        loopscope.attach(reference_model, tmp_path)
    with pytest.raises(LoopscopeError, match="mode="):
        loopscope.attach(reference_model, tmp_path / "m.h5", mode="r+")
    with pytest.raises(LoopscopeError, match="locking"):
        loopscope.attach(reference_model, tmp_path / "l.h5", locking="sometimes")


def test_locking_option_is_passed_to_h5py(reference_model, prompt_ids, tmp_path):
    """``locking=False`` (network file systems whose locks fail) for writing and reading alike."""
    path = tmp_path / "nfs.h5"
    with loopscope.attach(reference_model, path, locking=False) as cap:
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=2)
    assert cap.closed
    with loopscope.open(path, locking=False) as capture:
        assert capture.runs[0].states().shape == (prompt_ids.shape[1], 3, reference_model.config.n_embd)
        assert h5py.File(capture.runs[0].path, "r", locking=False).attrs["format"] == b"loopscope-run"
    with loopscope.open(path, locking="best-effort") as capture:
        assert len(capture.runs) == 1


def test_no_code_runs_from_files():
    """Nothing in the package unpickles or evaluates file contents: reading a capture can never execute code."""
    forbidden = re.compile(
        r"\bimport pickle\b|\bpickle\.load|allow_pickle\s*=\s*True|(?<![.\w])eval\(|(?<![.\w])exec\(|torch\.load\("
    )
    offenders = [
        f"{path.relative_to(PACKAGE_ROOT)}:{n}"
        for path in package_sources(PACKAGE_ROOT)
        if path.relative_to(PACKAGE_ROOT).parts[0] != "tests"
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if forbidden.search(line)
    ]
    assert not offenders, offenders


@st.composite
def _mutations(draw):
    return {
        "target": draw(st.sampled_from(["cap.h5", "cap.h5.runs/000000.h5", "cap.h5.runs/000001.h5"])),
        "kind": draw(st.sampled_from(["flip", "zero", "truncate"])),
        "where": draw(st.floats(0.0, 1.0)),
        "count": draw(st.integers(1, 64)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _mutate(path: Path, m: dict) -> None:
    size = os.path.getsize(path)
    start = min(int(m["where"] * size), size - 1)
    with open(path, "r+b") as f:
        if m["kind"] == "truncate":
            f.truncate(start)
            return
        f.seek(start)
        length = min(m["count"], size - start)
        if m["kind"] == "zero":
            f.write(bytes(length))
        else:
            data = bytearray(f.read(length))
            rng = np.random.default_rng(m["seed"])
            for i in range(length):
                data[i] ^= int(rng.integers(1, 256))
            f.seek(start)
            f.write(bytes(data))


# 40 fixed examples in the suite (deterministic); LOOPSCOPE_FUZZ_EXAMPLES=2000 for a longer hunt.
@settings(
    max_examples=int(os.environ.get("LOOPSCOPE_FUZZ_EXAMPLES", 40)),
    deadline=None,
    derandomize="LOOPSCOPE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutation=_mutations())
def test_fuzzed_files_never_escape_as_unhandled_exceptions(pristine, mutation):
    with tempfile.TemporaryDirectory() as folder:
        path = _copy(pristine, Path(folder))
        _mutate(path.parent / mutation["target"], mutation)
        try:
            with loopscope.open(path) as capture:
                capture.meta
                for run in capture.runs:
                    try:
                        run.token_ids, run.tokens, run.positions, run.attention_mask, run.forward_index
                        run.states()
                        m = token_metrics(run)
                        m.convergence_steps()
                        trajectory_pca(run, [0])
                    except LoopscopeError:
                        pass
        except LoopscopeError:
            pass
        _cli("info", path)
        _cli("plot", path, "--out", Path(folder) / "fig.png")


# ---- crafted structure: declared shapes, attributes and links, checked in a child under a memory limit ---------------
_WORKER = r"""
import json, os, resource, sys, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
from typer.testing import CliRunner
import loopscope
from loopscope.analysis import token_metrics
from loopscope.cli.app import app
from loopscope.errors import LoopscopeError

with open("/proc/self/status") as status:
    size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (size + 2_500_000_000,) * 2)
runner = CliRunner()
for line in sys.stdin:
    path, figure = line.rstrip("\n").split("\t")
    problems = []
    try:
        try:
            with loopscope.open(path) as capture:
                capture.meta
                for run in capture.runs:
                    try:
                        run.token_ids, run.tokens, run.positions, run.attrs, run.step_stride
                        for loop in run.loops:
                            run.states(loop=loop)
                            token_metrics(run, loop=loop).convergence_steps()
                    except LoopscopeError:
                        pass
        except LoopscopeError:
            pass
        for args in (["info", path], ["plot", path, "--out", figure]):
            result = runner.invoke(app, args)
            text = result.output
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                problems.append("".join(traceback.format_exception(result.exception)))
            elif result.exit_code not in (0, 1) or "Traceback" in text or "\x1b" in text:
                problems.append(text)
            elif result.exit_code == 1 and not text.strip().splitlines()[-1].startswith("error:"):
                problems.append(text)
    except BaseException:
        problems.append(traceback.format_exc())
    print(json.dumps(problems), flush=True)
"""


@pytest.fixture(scope="module")
def crafted_worker():
    """A child that checks one crafted capture per line of input (a fresh process per example would cost seconds)."""
    procs: list[subprocess.Popen] = []

    def check(path: Path, figure: Path) -> list[str]:
        if not procs or procs[-1].poll() is not None:  # a fresh one after a hang or a crash
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _WORKER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                )
            )
        proc = procs[-1]
        proc.stdin.write(f"{path}\t{figure}\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready:
            proc.kill()
            proc.wait()
            pytest.fail(f"{path}: no answer in 60 s (a hang)")
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            pytest.fail("the checking process died (killed for memory?)")
        return json.loads(line)

    yield check
    for proc in procs:
        if proc.poll() is None:
            proc.stdin.close()
            proc.wait(timeout=30)


_OBJECTS = {
    "cap.h5": ["readout", "readout/weight", "runs", "runs/000000"],
    "cap.h5.runs/000000.h5": [
        "token_ids",
        "attention_mask",
        "positions",
        "forward_index",
        "token_bytes",
        "token_ends",
        "loops",
        "loops/core",
        "loops/core/states",
        "loops/core/num_steps",
    ],
}
_ATTRS = {
    ("cap.h5", "/"): [
        "format",
        "format_version",
        "loops_json",
        "config_json",
        "loop_json",
        "name_or_path",
        "model_class",
        "capture_id",
        "created",
    ],
    ("cap.h5", "readout"): ["kind", "eps", "weight_offset"],
    ("cap.h5.runs/000000.h5", "/"): ["format", "step_stride", "call", "capture_id", "run_number"],
    ("cap.h5.runs/000000.h5", "loops/core/states"): ["logical_dtype", "compression", "source_chunks"],
}
_DIMS = st.sampled_from([0, 1, 3, 7, 64, 2**16, 2**20, 2**24, 2**31, 2**40])
_VALUES = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.sampled_from([2**62, np.uint64(2**64 - 1), float("nan"), float("inf"), True, np.arange(5), np.zeros((2, 2))]),
    st.text(alphabet=st.sampled_from("ab[/]$\\{}:\x1b\x07\x9b\n\u202e"), max_size=40),
    st.integers(1, 100_000).map(lambda n: np.bytes_(b"[" * n + b"]" * n)),
    st.binary(max_size=40).map(np.bytes_),
)


@st.composite
def _crafts(draw):
    kind = draw(st.sampled_from(["shape", "attr", "link", "group", "delete"]))
    if kind == "attr":
        target, obj = draw(st.sampled_from(sorted(_ATTRS)))
        return {
            "kind": kind,
            "file": target,
            "object": obj,
            "name": draw(st.sampled_from(_ATTRS[target, obj])),
            "value": draw(_VALUES),
        }
    target = draw(st.sampled_from(sorted(_OBJECTS)))
    craft = {"kind": kind, "file": target, "object": draw(st.sampled_from(_OBJECTS[target]))}
    if kind == "shape":
        craft["shape"] = tuple(draw(st.lists(_DIMS, min_size=1, max_size=3)))
        craft["dtype"] = draw(st.sampled_from(["i8", "f4", "u1", "f8", "u2"]))
    elif kind == "link":
        craft["link"] = draw(
            st.sampled_from(
                [
                    "soft:/nowhere",
                    "soft:/",
                    "soft:/loops",
                    "ext:fifo.h5",
                    "ext:/dev/zero",
                    "ext:missing.h5",
                    "ext:cap.h5",
                ]
            )
        )
    return craft


def _craft(folder: Path, craft: dict) -> None:
    with h5py.File(folder / craft["file"], "a") as f:
        name = craft["object"]
        if craft["kind"] == "attr":
            f[name].attrs[craft["name"]] = craft["value"]
            return
        if f.get(name, getlink=True) is not None:
            del f[name]
        if craft["kind"] == "shape":
            shape = craft["shape"]
            f.create_dataset(
                name,
                shape=shape,
                maxshape=(None,) * len(shape),
                dtype=craft["dtype"],
                chunks=tuple(max(1, min(d, 16)) for d in shape),
            )
        elif craft["kind"] == "group":
            f.create_group(name)
        elif craft["kind"] == "link":
            how, target = craft["link"].split(":", 1)
            f[name] = (
                h5py.SoftLink(target)
                if how == "soft"
                else h5py.ExternalLink(target if target.startswith("/") else str(folder / target), "/")
            )


# 30 fixed examples in the suite; LOOPSCOPE_FUZZ_EXAMPLES=2000 for a longer hunt.
@settings(
    max_examples=int(os.environ.get("LOOPSCOPE_FUZZ_EXAMPLES", 30)),
    deadline=None,
    derandomize="LOOPSCOPE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(craft=_crafts())
def test_crafted_shapes_attributes_and_links_give_one_line_errors(pristine, crafted_worker, craft):
    with tempfile.TemporaryDirectory() as folder:
        path = _copy(pristine, Path(folder))
        os.mkfifo(Path(folder) / "fifo.h5")
        _craft(Path(folder), craft)
        problems = crafted_worker(path, Path(folder) / "fig.png")
        assert not problems, f"{craft}: {problems[0]}"


def test_a_run_without_tokens_is_left_out_of_the_report_and_named_by_plots(tmp_path, pristine):
    """Every per-token dataset [0] and states [0, K, H] (a trimmed or foreign file): the report shows the other run
    with a note, and a report or a projection of that run alone is one line (was: numpy's zero-size ValueError)."""
    capture = _copy(pristine, tmp_path)
    with h5py.File(str(capture) + ".runs/000001.h5", "a") as f:
        for name in ("token_ids", "attention_mask", "positions", "forward_index", "token_ends", "loops/core/num_steps"):
            dtype = f[name].dtype
            del f[name]
            f.create_dataset(name, shape=(0,), dtype=dtype, maxshape=(None,), chunks=(1024,), fletcher32=True)
        states = f["loops/core/states"]
        steps, hidden, attrs = states.shape[1], states.shape[2], dict(states.attrs)
        del f["loops/core/states"]
        empty = f.create_dataset(
            "loops/core/states",
            shape=(0, steps, hidden),
            maxshape=(None, None, hidden),
            dtype="f4",
            chunks=(16, 4, hidden),
            fletcher32=True,
        )
        empty.attrs.update(attrs)
        f.attrs["n_tokens"] = 0
    code, output = _cli("report", capture, "--out", tmp_path / "all.html")
    assert code == 0, output
    assert "run 1 left out: run 1 holds no tokens" in (tmp_path / "all.html").read_text()
    code, output = _cli("report", capture, "--run", 1, "--out", tmp_path / "one.html")
    assert code == 1 and "holds no tokens" in output and len(output.strip().splitlines()) == 1, output
    code, output = _cli("plot", capture, "--kind", "pca", "--run", 1, "--out", tmp_path / "pca.png")
    assert code == 1 and "the run has no tokens" in output, output


@pytest.mark.parametrize("damage", ["eps", "weight_offset", "weight"])
def test_a_readout_norm_that_is_not_finite_is_named_as_damage(tmp_path, pristine, damage):
    """NaN in the stored norm would turn every state read out into NaN and be blamed on the model (was: 'every
    token has NaN or infinite states (the model blew up)')."""
    capture = _copy(pristine, tmp_path)
    with h5py.File(capture, "a") as f:
        readout = f["readout"]
        if damage == "weight":
            readout["weight"][0] = np.nan
        else:
            readout.attrs[damage] = np.nan
    found = "is 'nan'" if damage != "weight" else "holds NaN or infinite values"
    _assert_one_line_error(capture, f"the readout {damage} {found}; the index is damaged")
