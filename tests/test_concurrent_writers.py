"""A capture being written is never replaced under its writer, and a writer never writes where nothing can read it.

Real processes and real captures: a writer in a child process (as a second job started on the same study file),
``mode="w"`` tried from this one. Before, ``mode="w"`` removed the writing capture's runs (its open run file too)
and wrote a new index, and the first writer went on writing runs that belonged to neither capture; a removed output
directory was made again in silence; a folder that cannot be written was blamed on network file system locks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
from child_runs import run_script

import loopscope
from loopscope.errors import CaptureFileError, CaptureWriteError
from loopscope.storage import index, run_files
from loopscope.storage.verify import verify_capture

WRITER = textwrap.dedent(
    """
    import os, sys, torch
    torch.set_num_threads(1)
    import loopscope
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
    register(); torch.manual_seed(0)
    model = RavenReferenceForCausalLM(tiny_config()).eval()
    path, locking = sys.argv[1], {"default": None, "off": False}[sys.argv[2]]
    cap = loopscope.attach(model, path, locking=locking)

    def record(runs):
        with torch.no_grad():
            for _ in range(runs):
                model(torch.tensor([[101] + list(range(3, 30))]), num_steps=3)  # token 101: this writer's runs
        cap.flush()

    try:
        record(3)
        print("READY", os.getpid(), flush=True)
        sys.stdin.readline()  # the parent tries mode="w" meanwhile
        record(3)
        cap.close()
        print("CLOSED", flush=True)
    except loopscope.LoopscopeError as exc:
        print("ERROR", type(exc).__name__, exc, flush=True)
    """
)


def _start_writer(path, locking: str) -> tuple[subprocess.Popen, int]:
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), locking],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    if not line.startswith("READY"):
        child.kill()
        raise AssertionError(line + child.stderr.read())
    return child, int(line.split()[1])


def _record(model, path, token: int, runs: int = 1, **options) -> None:
    with loopscope.attach(model, path, **options), torch.no_grad():
        for _ in range(runs):
            model(torch.tensor([[token] + list(range(3, 20))]), num_steps=2)


def _writers(path) -> list[int]:
    """The first token of each complete run: which writer recorded it."""
    with loopscope.open(path) as capture:
        assert not capture.incomplete_runs
        return [int(run.token_ids[0]) for run in capture.runs]


def test_mode_w_is_refused_while_another_process_writes_the_capture(tmp_path, reference_model):
    path = tmp_path / "c.h5"
    child, pid = _start_writer(path, "default")
    try:
        refusal = f"{path} is being written by another capture (process {pid}?); wait for it to close or choose"
        with pytest.raises(CaptureFileError) as refused:
            loopscope.attach(reference_model, path, mode="w")
        assert str(refused.value).startswith(refusal)
        with pytest.raises(CaptureFileError, match="being written by another capture"):
            index.check_target(path, "w")  # asked before an expensive model load: the same answer
        out, err = child.communicate("go\n", timeout=120)
    finally:
        child.kill()
    assert "CLOSED" in out, out + err
    assert _writers(path) == [101] * 6  # every run of the writer kept, under its one capture
    assert verify_capture(path).ok
    assert sorted(os.listdir(f"{path}.runs")) == [f"{n:06d}.h5" for n in range(6)]  # the lock file went at close
    _record(reference_model, path, 7, mode="w")  # closed: now it may be replaced
    assert _writers(path) == [7]


def test_mode_w_is_refused_while_another_capture_of_this_process_writes(tmp_path, new_reference_model):
    """A flock belongs to its open file, not to the process: two captures in one process see each other too.
    Appending captures share the capture; mode="w" waits for the last of them to close."""
    path = tmp_path / "c.h5"
    first, second, third = (new_reference_model() for _ in range(3))
    ids = torch.tensor([[5] + list(range(3, 20))])
    a = loopscope.attach(first, path)
    with torch.no_grad():
        first(ids, num_steps=2)
    with pytest.raises(CaptureFileError, match="is being written by another capture"):
        loopscope.attach(third, path, mode="w")
    b = loopscope.attach(second, path, mode="a")
    with torch.no_grad():
        second(ids, num_steps=3)
    a.close()
    with pytest.raises(CaptureFileError, match="is being written by another capture"):
        loopscope.attach(third, path, mode="w")  # b still writes
    with torch.no_grad():
        second(ids, num_steps=4)
    b.close()
    with loopscope.open(path) as capture:
        assert sorted(int(run.num_steps[0]) for run in capture.runs) == [2, 3, 4]
    assert run_files.LOCK_FILE not in os.listdir(f"{path}.runs")
    _record(third, path, 7, mode="w")
    assert _writers(path) == [7]


def test_a_writer_whose_capture_was_replaced_stops_instead_of_writing_into_the_new_one(tmp_path, reference_model):
    """With locking=False (network file systems) no lock can refuse mode="w": the first writer then finds, before
    its next run, that the index is another capture's, and stops with one line. The new capture holds its own runs
    only (before, the first writer's runs landed in it, each 'belonging to another capture')."""
    path = tmp_path / "c.h5"
    child, _ = _start_writer(path, "off")
    try:
        _record(reference_model, path, 7, runs=2, mode="w", locking=False)
        out, err = child.communicate("go\n", timeout=120)
    finally:
        child.kill()
    error = [line for line in out.splitlines() if line.startswith("ERROR")]
    assert error and "CaptureWriteError" in error[0] and "was replaced by another capture" in error[0], out + err
    assert _writers(path) == [7, 7]
    result = verify_capture(path)
    assert result.ok and not result.incomplete, result.damaged


def test_a_removed_output_directory_is_an_error_not_made_again(tmp_path, reference_model):
    """Only the run folder is made again where it alone was removed (the index still finds the runs); a removed
    index (here with its whole directory) stops the capture with one line, and nothing is made again."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "c.h5"
    ids = torch.tensor([list(range(3, 20))])
    cap = loopscope.attach(reference_model, path)
    with torch.no_grad():
        reference_model(ids, num_steps=2)
    cap.flush()
    shutil.rmtree(f"{path}.runs")  # the run folder alone: made again, later runs kept
    with torch.no_grad():
        reference_model(ids, num_steps=3)
    cap.flush()
    assert os.listdir(f"{path}.runs") == ["000001.h5"]
    shutil.rmtree(out)
    removed = r"the capture's index c\.h5 was removed while it recorded"
    with pytest.raises(CaptureWriteError, match=removed), pytest.warns(RuntimeWarning, match="closed the capture"):
        with torch.no_grad():
            for _ in range(3):
                reference_model(ids, num_steps=2)
                cap.flush()
    cap.close()
    assert not out.exists()


def test_verify_lists_a_run_of_another_capture_as_damaged(tmp_path, new_reference_model):
    """The reader refuses a run file of another capture (info marks it damaged); verify said 'ok' of it."""
    ours, theirs = tmp_path / "ours.h5", tmp_path / "theirs.h5"
    _record(new_reference_model(), ours, 5, runs=2)
    _record(new_reference_model(), theirs, 6, runs=1)
    shutil.copy(f"{theirs}.runs/000000.h5", f"{ours}.runs/000002.h5")
    result = verify_capture(ours)
    assert not result.ok
    assert [(f.run, f.problem.split(" (")[0]) for f in result.damaged] == [(2, "belongs to another capture")]
    assert verify_capture(theirs).ok


def test_an_unwritable_folder_is_not_blamed_on_file_locking(tmp_path):
    """Permission denied: choose a folder you can write (as root, the child runs as nobody)."""
    folder = tempfile.mkdtemp()  # outside pytest's own (private) temporary folder, so that nobody reaches it
    os.chmod(folder, 0o555)
    script = textwrap.dedent(
        """
        import os, sys
        from loopscope.storage import index
        if os.getuid() == 0:
            os.setuid(65534)  # root ignores permission bits
        try:
            index.create_index(os.path.join(sys.argv[1], "c.h5"), header={"loops": ["core"]}, readout=None)
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    try:
        code, out, err = run_script(script, folder, timeout=120)
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)
    assert code == 0, err
    assert (
        out.strip()
        == f"CaptureFileError cannot create {folder}/c.h5 (Permission denied); choose a folder you can write"
    )


def test_a_read_only_file_system_is_named(tmp_path, reference_model):
    mount = tmp_path / "ro"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        with pytest.raises(CaptureFileError) as refused:
            loopscope.attach(reference_model, mount / "c.h5")
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    assert str(refused.value).endswith("(Read-only file system); the file system is read-only; choose another path")
