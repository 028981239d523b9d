"""Scale-out: per-rank capture under torchrun, `loopscope merge` over virtual datasets, and the Dask analysis
(local threads and a dask.distributed LocalCluster) against the single-process analysis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from capture_copies import copy_capture
from typer.testing import CliRunner

import loopscope
from loopscope.analysis import distributed as dd
from loopscope.analysis import token_metrics, trajectory_pca
from loopscope.analysis.metrics import METRICS
from loopscope.cli.app import app
from loopscope.errors import LoopscopeError, MergeError
from loopscope.examples.capture_torchrun import DEFAULT_PROMPTS
from loopscope.hooks import distributed as ranks
from loopscope.storage.merge import merge

PROMPT_A = "Looped models think by iterating."
PROMPT_B = "The state settles, or it does not."


# ---- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, two_run_capture):
    """Two captures of one model (two runs each: a generate, then a forward over the prompt) and their merge."""
    folder = tmp_path_factory.mktemp("study")
    a = two_run_capture(str(folder / "a.h5"), PROMPT_A, generate_steps=12, new_tokens=4, forward_steps=6)
    b = two_run_capture(str(folder / "b.h5"), PROMPT_B, generate_steps=9, new_tokens=3, forward_steps=5)
    merged = str(folder / "merged.h5")
    merge(merged, [a, b])
    return {"a": a, "b": b, "merged": merged, "folder": folder}


@pytest.fixture(scope="module")
def bf16_capture(tmp_path_factory, tokenizer, new_reference_model):
    path = str(tmp_path_factory.mktemp("bf16") / "bf16.h5")
    model = new_reference_model().to(torch.bfloat16)
    ids = tokenizer(PROMPT_A, return_tensors="pt").input_ids
    with loopscope.attach(model, path, tokenizer=tokenizer), torch.no_grad():
        torch.manual_seed(0)
        model(ids, num_steps=7)
    return path


def single_process(paths, runs=None, reference="final"):
    """The reference results: the streamed analysis, run by run."""
    out = []
    for path in paths:
        with loopscope.open(path) as capture:
            for run in [capture.run(i) for i in runs] if runs else capture.runs:
                out.append(token_metrics(run, reference))
    return out


def assert_same_metrics(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert (e.run, e.loop, e.space, e.reference) == (g.run, g.loop, g.space, g.reference)
        assert np.array_equal(e.num_steps, g.num_steps) and np.array_equal(e.token_ids, g.token_ids)
        assert e.tokens == g.tokens
        for name in METRICS:
            assert e[name].shape == g[name].shape
            assert np.array_equal(np.isnan(e[name]), np.isnan(g[name])), name
            assert np.allclose(e[name], g[name], rtol=1e-12, atol=1e-12, equal_nan=True), name


def assert_same_pca(expected, got):
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert (e.token, e.label) == (g.token, g.label)
        for field in ("projections", "explained", "centre"):
            assert np.allclose(getattr(e, field), getattr(g, field), rtol=1e-9, atol=1e-9), field


def all_states(path):
    with loopscope.open(path) as capture:
        return [run.states(raw=True) for run in capture.runs]


# ---- (a) torchrun capture and merge ----------------------------------------------------------------------------------
def test_torchrun_ranks_write_their_own_files_and_merge_maps_them_without_copying(tmp_path):
    out = tmp_path / "cap.h5"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "loopscope.examples.capture_torchrun",
        "--out",
        str(out),
        "--steps",
        "16",
        "--max-new-tokens",
        "3",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    rank_files = sorted(str(p) for p in tmp_path.glob("cap.rank*.h5"))
    assert [os.path.basename(p) for p in rank_files] == ["cap.rank00000.h5", "cap.rank00001.h5"]
    assert not out.exists()  # no rank wrote the shared name
    for rank, path in enumerate(rank_files):
        with loopscope.open(path) as capture:
            meta = capture.meta
            assert (meta["rank"], meta["world_size"], meta["local_rank"]) == (rank, 2, rank)
            assert meta["hostname"] == socket.gethostname()
            texts = ["".join(run.tokens) for run in capture.runs]
            mine = DEFAULT_PROMPTS[rank::2]
            assert len(texts) == len(mine) and all(t.startswith(p) for t, p in zip(texts, mine))

    merged = str(tmp_path / "study" / "merged.h5")
    os.makedirs(os.path.dirname(merged))
    summary = merge(merged, rank_files)
    sources = all_states(rank_files[0]) + all_states(rank_files[1])
    assert summary.runs == len(sources) == len(DEFAULT_PROMPTS)
    merged_states = all_states(merged)
    assert all(np.array_equal(m, s) for m, s in zip(merged_states, sources))  # exact, bit for bit

    # Nothing was copied: the merged datasets are virtual, the merge wrote a fraction of the state bytes, and a
    # change to a source's bytes shows through the merged file.
    state_bytes = sum(s.nbytes for s in sources)
    assert summary.state_bytes == state_bytes
    assert summary.file_bytes < state_bytes / 4
    with h5py.File(merged) as f:  # plain h5py, through the index's links
        names = sorted(f["runs"])
        assert names == [f"{i:06d}" for i in range(len(sources))]
        assert f["runs/000003/loops/core/states"].is_virtual
        assert np.array_equal(f["runs/000003/loops/core/states"][()], sources[3])
        assert f["runs/000003"].attrs["source_rank"] == 1
        assert f["runs/000003"].attrs["source_run"] == 1
        assert f["runs/000003"].attrs["source_file"].decode() == os.path.join("..", "cap.rank00001.h5")
        assert f["merged_runs"][()].tolist() == [[0, 0, 0], [1, 0, 1], [2, 1, 0], [3, 1, 1]]
    with loopscope.open(rank_files[1]) as capture:
        run_file = capture.runs[1].path
    with h5py.File(run_file, "r+") as f:
        f["loops/core/states"][0, 0, 0] = 1234.5
    with loopscope.open(merged) as capture:
        assert capture.runs[3].states(token=0)[0, 0] == 1234.5
        assert "merged_from_json" in capture.meta and "rank" not in capture.meta


def test_merged_capture_moves_with_its_sources_and_says_when_a_source_is_missing(study, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(study["folder"], moved)
    merged = str(moved / "merged.h5")
    expected = all_states(study["merged"])
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(all_states(merged), expected))
    shutil.rmtree(moved / "b.h5.runs")
    os.remove(moved / "b.h5")
    with loopscope.open(merged) as capture:
        dd.token_metrics(merged, runs=[0, 1])  # runs from a.h5 are still there
        from loopscope.storage.merge import check_sources

        with pytest.raises(MergeError, match=r"b\.h5\.runs.*missing"):
            check_sources(capture.runs[2])
    with pytest.raises(MergeError, match="missing; move merged captures together with their sources"):
        dd.token_metrics(merged)
    with loopscope.open(merged) as capture:  # the streamed reader says so too, rather than reading NaN
        np.testing.assert_array_equal(capture.runs[0].states(), expected[0])
        with pytest.raises(MergeError, match="missing"):
            capture.runs[2].states()


def test_signals_and_merges_of_merges_say_when_a_source_is_missing(tmp_path, reference_model, prompt_ids):
    """A merged signal is mapped like the states, and a merge of a merge is checked all the way down."""
    source = str(tmp_path / "a.h5")
    with loopscope.attach(reference_model, source):
        torch.manual_seed(0)
        reference_model.generate(prompt_ids, max_new_tokens=3, num_steps=8, criterion="kl", exit_threshold=1e-4)
    merge(str(tmp_path / "m1.h5"), [source])
    merge(str(tmp_path / "m2.h5"), [str(tmp_path / "m1.h5")])
    with loopscope.open(source) as a, loopscope.open(tmp_path / "m2.h5") as m2:
        np.testing.assert_array_equal(m2.runs[0].signal("exit_value"), a.runs[0].signal("exit_value"))
        np.testing.assert_array_equal(m2.runs[0].states(), a.runs[0].states())
    shutil.rmtree(tmp_path / "a.h5.runs")
    for name in ("m1.h5", "m2.h5"):
        with loopscope.open(tmp_path / name) as merged:
            with pytest.raises(MergeError, match=r"a\.h5\.runs.*missing"):
                merged.runs[0].signal("exit_value")
            with pytest.raises(MergeError, match="missing"):
                merged.runs[0].states()


# ---- (b) Dask analysis equals the single-process analysis ------------------------------------------------------------
def test_dask_threads_equal_single_process_over_many_files(study, bf16_capture):
    paths = [study["merged"], study["a"], study["b"], bf16_capture]
    # Small blocks: many blocks per run, so block boundaries are exercised.
    got = dd.token_metrics(paths, workers=2, block_bytes=1 << 14)
    assert_same_metrics(single_process(paths), got)
    assert len(got) == 4 + 2 + 2 + 1 and [m.run for m in got[:4]] == [0, 1, 2, 3]


def test_dask_reference_runs_and_files(study):
    a = study["a"]
    assert_same_metrics(single_process([a], runs=[1], reference=0), dd.token_metrics(a, runs=[1], reference=0))
    other = f"{a}:0"
    assert_same_metrics(
        single_process([study["merged"]], runs=[1], reference=other),
        dd.token_metrics(study["merged"], runs=[1], reference=other, scheduler="sync"),
    )


def test_dask_gives_the_update_measures_of_the_single_process_path(study):
    """assert_same_metrics compares every one of METRICS: the update measures too, defined from step 2 on."""
    assert {"update_cosine", "contraction"} <= set(METRICS)
    got = dd.token_metrics(study["a"], scheduler="sync", block_bytes=1 << 12)
    assert_same_metrics(single_process([study["a"]]), got)
    for m in got:
        for values in (m.update_cosine, m.contraction):
            assert values is not None and np.isnan(values[:, :2]).all() and np.isfinite(values[:, 2:]).any()


@pytest.mark.parametrize("basis", ["token", "shared"])
def test_dask_pca_equals_single_process(study, basis):
    with loopscope.open(study["merged"]) as capture:
        expected = trajectory_pca(capture.runs[2], [0, 3, -1], basis=basis)
    assert_same_pca(expected, dd.trajectory_pca([(study["merged"], 2, [0, 3, -1])], basis=basis, workers=2))


def test_dask_on_a_local_cluster_of_several_workers(study, bf16_capture, monkeypatch):
    distributed = pytest.importorskip("distributed")
    paths = [study["merged"], bf16_capture]
    with distributed.LocalCluster(
        n_workers=3,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=":0",
        silence_logs=50,
    ) as cluster:
        address = cluster.scheduler_address
        assert address.startswith("tcp://127.0.0.1:")
        got = dd.token_metrics(paths, scheduler=address, block_bytes=1 << 14)
        assert_same_metrics(single_process(paths), got)
        with loopscope.open(study["merged"]) as capture:
            expected = trajectory_pca(capture.runs[0], [1, 2], basis="shared")
        assert_same_pca(expected, dd.trajectory_pca([(study["merged"], 0, [1, 2])], basis="shared", scheduler=address))
        with distributed.Client(address) as client, distributed.get_task_stream(client) as stream:
            assert_same_metrics(single_process(paths), dd.token_metrics(paths, scheduler=client, block_bytes=1 << 12))
            pids = client.run(os.getpid)
        assert len(set(pids.values())) == 3 and os.getpid() not in pids.values()
        assert len({task["worker"] for task in stream.data}) > 1  # the blocks ran on several worker processes
        # a path relative to the caller's directory, which is not the workers' (they started before the chdir)
        folder, name = os.path.split(os.path.abspath(study["merged"]))
        monkeypatch.chdir(folder)
        assert_same_metrics(single_process([study["merged"]]), dd.token_metrics([name], scheduler=address))
        with loopscope.open(study["merged"]) as capture:  # a reference file named relative to the caller, too
            expected = [token_metrics(capture.run(1), reference=capture.run(1))]
        assert_same_metrics(expected, dd.token_metrics([name], runs=[1], reference=f"{name}:1", scheduler=address))


def test_cli_convergence_on_dask_writes_the_same_csv(study, tmp_path):
    runner = CliRunner()
    plain, threaded = tmp_path / "plain.csv", tmp_path / "threaded.csv"
    for out, extra in ((plain, []), (threaded, ["--workers", "2"])):
        result = runner.invoke(app, ["convergence", study["merged"], "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    assert plain.read_text() == threaded.read_text()


def test_dask_reads_the_runs_that_are_there_with_missing_skip(two_run_capture, tmp_path):
    """--missing skip reaches every file the Dask path opens (planning, labels, reference tasks), as the streamed
    path: it once failed on the run file that --missing skip said to leave out."""
    source = two_run_capture(str(tmp_path / "a.h5"), PROMPT_A, generate_steps=5, new_tokens=2, forward_steps=4)
    path = copy_capture(Path(source), tmp_path / "copy", "gone.h5")
    (Path(str(path) + ".runs") / "000000.h5").unlink()
    runner = CliRunner()
    plain, threaded = tmp_path / "plain.csv", tmp_path / "threaded.csv"
    for out, extra in ((plain, []), (threaded, ["--workers", "2"])):
        result = runner.invoke(app, ["convergence", str(path), "--missing", "skip", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
    assert plain.read_text() == threaded.read_text()
    with loopscope.open(path, missing="skip") as capture:
        expected = [token_metrics(capture.run(1), reference=1)]
    assert_same_metrics(expected, dd.token_metrics(path, reference=1, missing="skip", scheduler="sync"))
    # and a reference named by file is opened as the capture was: its own missing run file is skipped too
    by_file = f"{path}:1"
    for extra in ([], ["--workers", "2"]):
        out = tmp_path / f"by_file{len(extra)}.csv"
        command = ["convergence", str(path), "--missing", "skip", "--reference", by_file, "--out", str(out), *extra]
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
    assert_same_metrics(expected, dd.token_metrics(path, reference=by_file, missing="skip", scheduler="sync"))


# ---- (c) errors ------------------------------------------------------------------------------------------------------
def test_merge_errors_are_one_line(study, tmp_path, tokenizer, new_reference_model):
    a, b = study["a"], study["b"]
    out = str(tmp_path / "m.h5")
    cases = [
        (lambda: merge(study["merged"], [a, b]), "already exists; pass --force"),
        (lambda: merge(out, []), "at least one capture"),
        (lambda: merge(out, [a, str(tmp_path / "nope.h5")]), r"nope\.h5: no such file"),
        (lambda: merge(out, [a, a]), "given twice"),
        (lambda: merge(a, [a, b], force=True), "is also a source"),
        (lambda: merge(str(tmp_path / "no" / "m.h5"), [a]), "does not exist; create it first"),
    ]
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    cases.append((lambda: merge(out, [a, str(garbage)]), "not a readable HDF5 file"))
    damaged = tmp_path / "damaged"
    shutil.copytree(study["folder"], damaged, ignore=shutil.ignore_patterns("merged*"))
    run_file = damaged / "b.h5.runs" / "000001.h5"
    run_file.write_bytes(run_file.read_bytes()[:300])
    cases.append((lambda: merge(out, [a, str(damaged / "b.h5")]), r"b\.h5\.runs/000001\.h5"))
    renamed = tmp_path / "renamed"
    shutil.copytree(study["folder"], renamed, ignore=shutil.ignore_patterns("merged*"))
    with h5py.File(renamed / "b.h5", "r+") as f:
        f.attrs["loops_json"] = np.bytes_(b'["other"]')
    cases.append((lambda: merge(out, [a, str(renamed / "b.h5")]), "recorded loops"))

    wide = str(tmp_path / "wide.h5")
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, tiny_config

    torch.manual_seed(0)
    model = RavenReferenceForCausalLM(
        tiny_config(n_embd=32, vocab_size=len(tokenizer), padded_vocab_size=len(tokenizer))
    )
    ids = tokenizer(PROMPT_A, return_tensors="pt").input_ids
    with loopscope.attach(model.eval(), wide), torch.no_grad():
        model(ids, num_steps=3)
    cases.append((lambda: merge(out, [a, wide]), "hidden size 32"))
    half = str(tmp_path / "half.h5")
    model = new_reference_model()
    with loopscope.attach(model, half, dtype="bfloat16"), torch.no_grad():
        model(ids, num_steps=3)
    cases.append((lambda: merge(out, [a, half]), "dtype bfloat16"))
    other_norm = tmp_path / "other_norm"
    shutil.copytree(study["folder"], other_norm, ignore=shutil.ignore_patterns("merged*"))
    with h5py.File(other_norm / "b.h5", "r+") as f:
        f["readout/weight"][0] += 1.0  # a fine-tuned model of the same architecture
    cases.append((lambda: merge(out, [a, str(other_norm / "b.h5")]), "different readout norms"))

    for call, message in cases:
        with pytest.raises(MergeError, match=message) as info:
            call()
        assert "\n" not in str(info.value)
    assert not os.path.exists(out) and not os.path.exists(out + ".runs")  # refused before anything was written

    summary = merge(study["merged"], [a, b], force=True)
    assert summary.runs == 4
    result = CliRunner().invoke(app, ["merge", study["merged"], a, b])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "--force" in result.output


def test_dask_errors_are_one_line(study, monkeypatch):
    merged = study["merged"]
    with pytest.raises(LoopscopeError, match="scheduler='nonsense'"):
        dd.token_metrics(merged, scheduler="nonsense")
    with pytest.raises(LoopscopeError, match="workers=0"):
        dd.token_metrics(merged, workers=0)
    with pytest.raises(LoopscopeError, match="workers= sets local threads"):
        dd.token_metrics(merged, scheduler="tcp://127.0.0.1:9", workers=2)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(dd, "CONNECT_TIMEOUT", "1s")
    with pytest.raises(LoopscopeError, match="cannot reach the Dask scheduler"):
        dd.token_metrics(merged, scheduler=f"tcp://127.0.0.1:{port}")
    with pytest.raises(LoopscopeError, match="has no run 9"):
        dd.token_metrics(merged, runs=[9])
    result = CliRunner().invoke(app, ["convergence", merged, "--out", "x.csv", "--scheduler", "nonsense"])
    assert result.exit_code == 1 and result.output.count("\n") == 1


def test_without_dask_the_package_imports_and_says_what_to_install(study, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(LoopscopeError, match=r"pip install 'loopscope\[scale\]'"):
        dd.token_metrics(study["merged"])
    with loopscope.open(study["merged"]) as capture:  # everything else works without dask
        token_metrics(capture.runs[0])
    # the CLI prints the same line, brackets included (rich would read "[scale]" as markup)
    result = CliRunner().invoke(
        app, ["convergence", study["merged"], "--out", str(tmp_path / "m.csv"), "--workers", "2"]
    )
    assert result.exit_code == 1 and "pip install 'loopscope[scale]'" in result.output


def test_rank_paths_and_header(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert ranks.rank_path("cap.h5") == "cap.h5"
    assert ranks.rank_path("cap-{rank}.h5") == "cap-00000.h5"
    assert ranks.describe()["world_size"] == 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ranks.rank_path(os.path.join("out", "cap.h5")) == os.path.join("out", "cap.rank00003.h5")
    assert ranks.rank_path("run_{rank}/cap.h5") == "run_00003/cap.h5"
    assert ranks.describe() == {"rank": 3, "world_size": 4, "local_rank": 1, "hostname": socket.gethostname()}
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(LoopscopeError, match="rank 4 of world size 4"):
        ranks.rank_path("cap.h5")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LoopscopeError, match="RANK='x' is not an integer"):
        ranks.rank_path("cap.h5")


def test_attach_under_a_launcher_writes_the_rank_file(tmp_path, monkeypatch, reference_model, prompt_ids):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with loopscope.attach(reference_model, tmp_path / "cap.h5") as cap, torch.no_grad():
        reference_model(prompt_ids, num_steps=2)
    assert cap.path == str(tmp_path / "cap.rank00001.h5") and not (tmp_path / "cap.h5").exists()
    with loopscope.open(cap.path) as capture:
        assert (capture.meta["rank"], capture.meta["world_size"], capture.meta["local_rank"]) == (1, 2, 1)
