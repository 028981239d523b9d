"""What the command line says when something is off: the folder or directory it names, the flag it asks for, the
counts it gives, and nothing at all on stderr when nothing is off."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
import torch
import typer
from typer.testing import CliRunner

import loopscope
from loopscope.cli.app import app
from loopscope.cli.output import for_cli
from loopscope.errors import CaptureFileError, LoopscopeError
from loopscope.hooks.pretrained import check_model_path
from loopscope.models.demo import run_demo
from loopscope.storage.index import check_target


@pytest.fixture(scope="module")
def capture_path(two_run_capture, tmp_path_factory) -> Path:
    """Run 0: generate (prompt and 2 new tokens); run 1: a forward over the prompt alone. Tests only read it."""
    return two_run_capture(tmp_path_factory.mktemp("messages") / "cap.h5", "Short prompt.", 3, 2, 2)


def _cli(*args) -> tuple[int, str]:
    """(exit code, output) of one command; an error is one line starting with 'error:', never a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    if result.exit_code:
        assert result.exit_code == 1, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert result.output.startswith("error:"), result.output
    return result.exit_code, result.output


def test_missing_run_folder_is_named_unless_the_capture_is_empty(capture_path, reference_model, tmp_path):
    index = tmp_path / "moved.h5"
    shutil.copyfile(capture_path, index)  # the index alone, as if copied without its .runs folder
    with pytest.raises(CaptureFileError, match=r"moved\.h5\.runs is missing"):
        loopscope.open(index)
    for args in (("info", index), ("plot", index, "--out", tmp_path / "x.png")):
        code, output = _cli(*args)
        assert code == 1 and "moved.h5.runs is missing" in output and "no complete runs" not in output

    unclosed = tmp_path / "unclosed.h5"  # killed before its clean close: the index lists no runs, yet had some
    shutil.copyfile(capture_path, unclosed)
    with h5py.File(unclosed, "a") as f:
        del f["runs"]
    with pytest.raises(CaptureFileError, match=r"unclosed\.h5\.runs is missing"):
        loopscope.open(unclosed)

    empty = tmp_path / "empty.h5"  # closed with no runs; its empty folder is easily lost (git keeps none)
    with loopscope.attach(reference_model, empty):
        pass
    shutil.rmtree(str(empty) + ".runs")
    with loopscope.open(empty) as capture:
        assert capture.runs == []
    assert _cli("info", empty)[0] == 0


def test_missing_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for model in (tmp_path / "no" / "model", "./no-model", "~/no-such-loopscope-model", "models/huginn"):
        code, output = _cli("capture", model, "--prompt", "hi", "--out", tmp_path / "c.h5")
        assert code == 1 and f"model directory {model} does not exist" in output, output
        assert "repo" not in output.lower()
    for hub_id in ("gpt2", "tomg-group-umd/huginn-0125"):
        check_model_path(hub_id)  # left to transformers: they name hub repositories
    with pytest.raises(LoopscopeError, match="model directory a/b/c does not exist"):
        check_model_path("a/b/c")


CLI = "from loopscope.cli.app import main; main()"


def _child(script: str, *args, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str, float]:
    """(exit code, stdout, stderr, seconds) of ``python -c script args`` in a child, which reads ``env``'s HF_*
    variables afresh (huggingface_hub reads them once, at import)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    child_env.update(COLUMNS="400", **env)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=child_env
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - start


@pytest.fixture
def unreachable_hub(tmp_path):
    """HF_* variables for a child: an empty cache, and a hub endpoint on a port that refuses connections."""
    with socket.socket() as closed:  # bound, never listening: a connection is refused at once, no network needed
        closed.bind(("127.0.0.1", 0))
        yield {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}


def _cache_model(hf_home: str, repo_id: str) -> None:
    """Put the demo model into a Hugging Face cache as hub downloads leave it (refs/main names the snapshot)."""
    from loopscope.models.demo import MODEL_DIR

    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(MODEL_DIR, repo / "snapshots" / commit)


def test_a_hub_id_the_hub_cannot_serve_fails_at_once(unreachable_hub, tmp_path):
    """Was ~50 s of huggingface_hub retries (a model load asks for each file five times) before any error."""
    out = tmp_path / "c.h5"
    for offline in ({}, {"HF_HUB_OFFLINE": "1"}):
        code, _, stderr, seconds = _child(
            CLI, "capture", "nonexist_dir", "--prompt", "hi", "--out", out, env={**unreachable_hub, **offline}
        )
        assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
        assert stderr.startswith("error: nonexist_dir is neither a local directory nor in the Hugging Face cache")
        assert ("HF_HUB_OFFLINE is set" if offline else "cannot be reached (") in stderr, stderr
        assert seconds < 20, seconds  # the child's imports take a few seconds; the check itself well under one
        assert not out.exists()


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_a_cached_hub_model_loads_without_the_hub(unreachable_hub, tmp_path, offline):
    """A cached model loads from the cache alone, quickly, whether or not offline mode is set (was: minutes of
    retries for each optional file the cache lacks when the hub is unreachable)."""
    _cache_model(unreachable_hub["HF_HOME"], "demo-org/looped-demo")
    env = {**unreachable_hub, **({"HF_HUB_OFFLINE": "1"} if offline else {})}
    out = tmp_path / "cached.h5"
    code, _, stderr, seconds = _child(CLI, "capture", "demo-org/looped-demo", "--prompt", "hi", "--out", out, env=env)
    assert code == 0, stderr
    assert seconds < 30, seconds
    with loopscope.open(out) as capture:
        assert capture.meta["name_or_path"] == "demo-org/looped-demo" and capture.runs[0].num_tokens > 0


class _Hub(http.server.BaseHTTPRequestHandler):
    """A stand-in hub: the "served" organisation has every model, "gone" none, "down" answers 503."""

    def do_HEAD(self):
        org = self.path.strip("/").split("/")[0]
        status, headers = {
            "served": (200, {"X-Repo-Commit": "0" * 40, "ETag": '"abc"', "Content-Length": "2"}),
            "gone": (401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}),
        }.get(org, (503, {}))
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_hub_check_asks_once_and_names_what_is_wrong(tmp_path):
    """One HEAD request decides: served (load as usual), no such model, or a hub error, each on one line."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script = """if True:
        import sys
        from loopscope.errors import LoopscopeError
        from loopscope.hooks.hub import cache_only
        for name in sys.argv[1:]:
            try:
                print(name, "cache only" if cache_only(name) else "from the hub")
            except LoopscopeError as exc:
                print(name, "error:", exc)
    """
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
    try:
        code, stdout, stderr, _ = _child(script, "served/model", "gone/model", "down/model", env=env)
    finally:
        server.shutdown()
    assert code == 0, stderr
    served, gone, down = stdout.strip().splitlines()
    assert served == "served/model from the hub"
    assert "error: gone/model is neither" in gone and "has no such model: check the name" in gone, gone
    assert "error: down/model is neither" in down and "answered HTTP 503: try again later" in down, down


def test_cli_errors_name_flags_not_python_keywords(capture_path, tmp_path):
    code, output = _cli("capture", "gpt2", "--prompt", "hi", "--out", capture_path)  # refused before any load
    assert code == 1 and "pass --mode w to overwrite it or --mode a to add runs to it" in output, output
    with pytest.raises(CaptureFileError, match="pass mode='w'"):  # the API keeps its own words
        check_target(str(capture_path), "w-")

    one = tmp_path / "one.h5"
    shutil.copyfile(capture_path, one)
    shutil.copytree(str(capture_path) + ".runs", str(one) + ".runs")
    (Path(str(one) + ".runs") / "000001.h5").unlink()
    code, output = _cli("info", one)
    assert code == 1 and "pass --missing skip to read the rest" in output and "missing='skip'" not in output

    lock = for_cli("cannot lock x.h5.runs (Errno 38); on a network file system pass locking=False")
    assert "locking=False" not in lock and "local disk" in lock
    assert for_cli("pass --force (force=True) to replace it") == "pass --force to replace it"
    assert for_cli("use space='state' for the raw latent state") == "use --space state for the raw latent state"
    assert "--step-stride 1 or --tokens to" in for_cli("use step_stride=1 or tokens= to save space")
    assert "--trust-remote-code" in for_cli("(a model with its own code needs trust_remote_code=True)")


def test_a_shorter_reference_says_how_many_tokens_each_has(capture_path, tmp_path):
    with loopscope.open(capture_path) as capture:
        long, short = capture.run(0).num_tokens, capture.run(1).num_tokens
    assert short < long
    code, output = _cli("plot", capture_path, "--run", 0, "--reference", 1, "--out", tmp_path / "x.png")
    assert code == 1 and "covers other tokens" not in output, output
    assert f"reference run 1 has {short} token(s) and run 0 has {long}" in output
    assert "must cover at least the run's tokens" in output
    assert _cli("plot", capture_path, "--run", 1, "--reference", 0, "--out", tmp_path / "y.png")[0] == 0


def test_every_run_option_documents_negative_indices():
    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    documented = {}
    for name, command in commands.items():
        for param in command.params:
            if "--run" in getattr(param, "opts", ()):
                documented[name] = param.help
    assert set(documented) == {"plot", "convergence", "export", "lens", "report"}
    for name, help_text in documented.items():
        assert "negative counts from the last run" in help_text and "-1" in help_text, (name, help_text)


def test_a_successful_plot_prints_nothing_on_stderr(capture_path, tmp_path):
    for args in (
        ["plot", capture_path, "--out", tmp_path / "h.png"],
        ["plot", capture_path, "--kind", "curves", "--run", 0, "--run", -1, "--out", tmp_path / "c.png"],
        ["convergence", capture_path, "--out", tmp_path / "m.csv"],
    ):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert result.stderr == "", repr(result.stderr)


def test_demo_refuses_a_previous_demo_unless_forced(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "demo.h5").write_bytes(b"a previous demo")
    code, output = _cli("demo", "--out", out, "--steps", 2, "--max-new-tokens", 1)
    assert code == 1 and "previous demo (demo.h5)" in output and "--force" in output and "force=True" not in output
    assert (out / "demo.h5").read_bytes() == b"a previous demo"
    with pytest.raises(LoopscopeError, match=r"force=True"):
        run_demo(out, steps=2, max_new_tokens=1)
    (tmp_path / "file").write_text("")
    assert _cli("demo", "--out", tmp_path / "file")[0] == 1

    assert _cli("demo", "--out", out, "--steps", 2, "--max-new-tokens", 1, "--force")[0] == 0
    with loopscope.open(out / "demo.h5") as capture:
        assert len(capture.runs) == 1
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"  # a folder with other files but no demo: nothing to replace, so no refusal
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert _cli("demo", "--out", other, "--steps", 2, "--max-new-tokens", 1)[0] == 0


def test_appending_to_an_empty_capture_whose_folder_was_lost_recreates_it(reference_model, prompt_ids, tmp_path):
    """An empty capture copied without its (empty) run folder, as git does, still takes runs with mode='a'."""
    path = tmp_path / "empty.h5"
    loopscope.attach(reference_model, path).close()
    shutil.rmtree(f"{path}.runs")
    with loopscope.attach(reference_model, path, mode="a"), torch.no_grad():
        reference_model(prompt_ids, num_steps=2)
    with loopscope.open(path) as capture:
        assert [run.num_tokens for run in capture.runs] == [prompt_ids.shape[1]]


def test_messages_name_the_option_and_the_file_at_fault(capture_path, two_run_capture, tmp_path):
    """--other is named as --other with the missing file said; a reference from another capture names that file
    (both sides are often "run 0"); --criterion without new tokens says only that."""
    from loopscope.models.demo import MODEL_DIR

    code, output = _cli("plot", capture_path, "--kind", "compare", "--other", "nope.h5:0", "--out", tmp_path / "c.png")
    assert code == 1 and "--other nope.h5:0: nope.h5 does not exist" in output and "reference" not in output, output
    code, output = _cli("plot", capture_path, "--reference", tmp_path / "nope.h5", "--out", tmp_path / "c.png")
    assert code == 1 and f"--reference {tmp_path / 'nope.h5'}: " in output and "does not exist" in output, output
    other = two_run_capture(tmp_path / "other.h5", "Entirely different words here, and more of them.", 3, 2, 2)
    code, output = _cli("plot", capture_path, "--run", 1, "--reference", f"{other}:1", "--out", tmp_path / "r.png")
    assert code == 1 and f"reference run 1 of {other} covers other tokens than run 1" in output, output
    code, output = _cli("plot", capture_path, "--run", 0, "--reference", 1, "--out", tmp_path / "s.png")
    assert code == 1 and "reference run 1 has" in output and " of " not in output.split(";")[0], output
    args = ["capture", MODEL_DIR, "--prompt", "hi", "--steps", 2, "--criterion", "kl", "--out", tmp_path / "x.h5"]
    code, output = _cli(*args)
    assert code == 1 and "give --max-new-tokens > 0" in output and "need Huginn" not in output, output
    assert not (tmp_path / "x.h5").exists()
