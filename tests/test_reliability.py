"""Failures that must not cost data: a write that fails mid-capture, and a reader while capture goes on.

Both run a real capture in a child process (real files, real h5py, real OS limits).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import loopscope

CHILD_PRELUDE = textwrap.dedent(
    """
    import os, resource, signal, sys, time, torch
    import loopscope
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
    from loopscope.errors import CaptureWriteError
    register(); torch.manual_seed(0)
    model = RavenReferenceForCausalLM(tiny_config()).eval()
    path = sys.argv[1]
    """
)


def _run_child(body: str, path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(body), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


FULL_DISK_BODY = """
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
    cap = loopscope.attach(model, path)
    short = torch.arange(3, 11).unsqueeze(0)
    errors = []
    with torch.no_grad():
        model(short, num_steps=4); model(short, num_steps=5)
        try:  # the writer trails the model, so the error surfaces at this call, the next one, or close()
            model(torch.arange(3, 259).unsqueeze(0), num_steps=16)  # ~1 MB of states: over the limit
            for _ in range(50):
                model(short, num_steps=3)
        except CaptureWriteError as exc:
            errors.append(str(exc))
        print("HOOKS", any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()))
        torch.manual_seed(5); after = model(short, num_steps=3).logits
    try:
        cap.close()
    except CaptureWriteError as exc:
        errors.append(str(exc))
    print("ERROR", errors[0] if errors else "none")
    torch.manual_seed(5); print("SAME", torch.equal(after, model(short, num_steps=3).logits), flush=True)
    """


def test_failed_write_keeps_earlier_runs_and_detaches(tmp_path):
    """A file-size limit (as a full quota would) hits the third run: one clear error, hooks gone, runs 0-1 intact."""
    child = _run_child(FULL_DISK_BODY, tmp_path / "full.h5")
    out, err = child.communicate(timeout=120)
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert "SAME" in lines, err  # the child got through capture, failure, close and a clean model call
    assert lines["ERROR"].startswith("writing") and "File too large" in lines["ERROR"]
    assert "\n" not in lines["ERROR"]
    assert lines["HOOKS"] == "False" and lines["SAME"] == "True"
    with loopscope.open(tmp_path / "full.h5") as capture:
        assert [int(r.num_steps[0]) for r in capture.runs] == [4, 5]
        for run in capture.runs:
            assert not np.isnan(run.states()).any()
        assert len(capture.incomplete_runs) == 1


def test_process_exits_cleanly_after_failed_write(tmp_path):
    """HDF5 used to flush chunks left dirty by the failed write again at library shutdown, and could crash there;
    run files have no chunk cache now, so nothing is left to flush."""
    for _ in range(3):
        child = _run_child(FULL_DISK_BODY, tmp_path / "exit.h5")
        child.communicate(timeout=120)
        assert child.returncode == 0
        for leftover in (tmp_path / "exit.h5.runs").iterdir():
            leftover.unlink()
        (tmp_path / "exit.h5").unlink()


def test_reader_sees_completed_runs_while_capture_runs(tmp_path):
    body = """
    cap = loopscope.attach(model, path)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        for i in range(3):
            model(ids, num_steps=i + 2)
    cap.flush()  # the writer trails the model; wait for it
    print("READY", flush=True)
    sys.stdin.readline()  # wait while the parent reads
    with torch.no_grad():
        model(ids, num_steps=9)
    cap.close()
    print("DONE", flush=True)
    """
    path = tmp_path / "live.h5"
    child = _run_child(body, path, stdin=subprocess.PIPE)
    assert child.stdout.readline().strip() == "READY", child.stderr.read()
    with loopscope.open(path) as capture:  # the capture is still open in the child
        assert [int(r.num_steps[0]) for r in capture.runs] == [2, 3, 4]
        assert capture.runs[2].states().shape == (16, 5, 64)
    child.stdin.write("\n")
    child.stdin.flush()
    out, err = child.communicate(timeout=60)
    assert "DONE" in out, err
    with loopscope.open(path) as capture:
        assert [int(r.num_steps[0]) for r in capture.runs] == [2, 3, 4, 9]


def test_killed_writer_keeps_completed_runs(tmp_path):
    body = """
    cap = loopscope.attach(model, path)
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        for i in range(10_000):
            model(ids, num_steps=6)
            if i < 5:
                cap.flush()  # these five are on disk when announced; the kill lands while later ones are written
            print("RUN", i, flush=True)
    """
    path = tmp_path / "killed.h5"
    child = _run_child(body, path)
    finished = 0
    deadline = time.monotonic() + 60
    while finished < 5 and time.monotonic() < deadline:
        if child.stdout.readline().startswith("RUN"):
            finished += 1
    child.kill()  # SIGKILL, mid-capture
    child.wait(timeout=30)
    assert finished == 5
    with loopscope.open(path) as capture:
        assert len(capture.runs) >= finished
        for run in capture.runs:
            assert run.states().shape == (32, 7, 64) and not np.isnan(run.states()).any()


def test_a_real_full_disk_mid_generation_keeps_completed_runs_and_exits_cleanly(tmp_path):
    """A real small file system (tmpfs, mounted when running as root) filling up mid-generate(): one clear error,
    a clean process exit (HDF5 once crashed at shutdown here), and every completed run intact."""
    with _small_file_system(tmp_path, "1200k") as mount:
        body = """
        errors = []
        cap = loopscope.attach(model, path)
        try:
            with torch.no_grad():
                for i in range(40):
                    model.generate(torch.arange(3, 40).repeat(2, 1), num_steps=16, max_new_tokens=30, do_sample=False)
                    cap.flush()
                    print("RUN", i, flush=True)
        except CaptureWriteError as exc:
            errors.append(str(exc))
        try:
            cap.close()
        except CaptureWriteError as exc:
            errors.append(str(exc))
        print("ERROR", errors[0] if errors else "none", flush=True)
        """
        child = _run_child(body, mount / "c.h5")
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0, err[-2000:]
        lines = out.strip().splitlines()
        error = [line for line in lines if line.startswith("ERROR")][0]
        assert "No space left on device" in error and "\n" not in error
        flushed = sum(line.startswith("RUN") for line in lines)
        with loopscope.open(mount / "c.h5") as capture:
            assert len(capture.runs) >= 2 * flushed  # two rows per generate() call, each flushed run complete
            for run in capture.runs:
                assert not np.isnan(run.states()).any()


@contextlib.contextmanager
def _small_file_system(tmp_path, size: str):
    """A tmpfs of ``size`` mounted under ``tmp_path`` (as root; else the test is skipped), unmounted at the end."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


FILL_BODY = """
    slack, phase = int(sys.argv[2]), sys.argv[3]
    folder = os.path.dirname(path)

    def fill():  # leave ``slack`` bytes free on the small file system
        st = os.statvfs(folder)
        with open(os.path.join(folder, "filler"), "wb") as f:
            try:
                f.write(b"\\0" * max(st.f_bavail * st.f_frsize - slack, 0))
            except OSError:
                pass

    short = torch.arange(3, 20).unsqueeze(0)
    if phase == "attach":
        fill()
    try:
        cap = loopscope.attach(model, path)
    except loopscope.LoopscopeError as exc:
        print("ERROR", type(exc).__name__, str(exc), flush=True)
        sys.exit(0)
    with torch.no_grad():
        for i in range(40):
            model(short, num_steps=2)
    cap.flush()
    fill()
    try:
        cap.close()
        print("CLOSED", flush=True)
    except loopscope.LoopscopeError as exc:
        print("ERROR", type(exc).__name__, str(exc), flush=True)
    """


def test_a_full_disk_at_attach_or_close_is_one_line_and_crashes_nothing(tmp_path):
    """The disk fills while attach() writes the new index, or while close() rewrites it with the run links: one
    line naming the full disk, a clean exit (HDF5 crashed the process when its own flush met the full disk inside
    an object's release), no temporary file left, and every run recorded before close() still readable."""
    with _small_file_system(tmp_path, "4m") as mount:
        for phase, slack in [("attach", s) for s in (0, 3000, 5000, 6500, 8000)] + [
            ("close", s) for s in (9000, 14000)
        ]:
            for name in os.listdir(mount):
                path = mount / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            child = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    CHILD_PRELUDE + textwrap.dedent(FILL_BODY),
                    str(mount / "c.h5"),
                    str(slack),
                    phase,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert child.returncode == 0, (phase, slack, child.stderr[-2000:])
            left = sorted(os.listdir(mount))
            assert not [n for n in left if n.endswith(".tmp")], left
            if "CLOSED" in child.stdout:  # the slack happened to be enough: nothing to check but the runs
                continue
            error = [line for line in child.stdout.splitlines() if line.startswith("ERROR")][0]
            assert "No space left on device" in error and "Traceback" not in child.stderr, (phase, slack, child.stderr)
            if phase == "attach":
                assert error.startswith("ERROR CaptureFileError") and error.endswith("free some space"), error
                assert left == ["filler"], left  # no index and no empty run folder
            else:
                assert error.startswith("ERROR CaptureWriteError") and "every completed run is kept" in error
                with loopscope.open(mount / "c.h5") as capture:
                    assert len(capture.runs) == 40 and capture.runs[-1].num_tokens == 17


FEW_FILES_BODY = """
    import errno, io, contextlib, numpy as np
    from loopscope.cli.app import app
    from loopscope.storage import merge
    from loopscope.analysis import token_metrics
    folder = os.path.dirname(path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))  # far fewer descriptors than the capture has runs

    def cli(*args):
        sys.argv = ["loopscope", *map(str, args)]
        try:
            app()
        except SystemExit as exc:
            assert not exc.code, (args, exc.code)

    merge.merge(os.path.join(folder, "m.h5"), [path])
    for name in ("c.h5", "m.h5"):
        with loopscope.open(os.path.join(folder, name)) as capture:
            first = capture.runs[0].states()
            total = sum(float(np.nansum(run.states())) for run in capture.runs)
            metrics = [token_metrics(run) for run in capture.runs]
            assert np.array_equal(capture.run(0).states(), first, equal_nan=True)  # closed, then opened again
            print(name, len(capture.runs), len(metrics), round(total, 3), flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        cli("info", os.path.join(folder, "m.h5"))
        cli("convergence", path, "--out", os.path.join(folder, "c.csv"))
        cli("export", os.path.join(folder, "m.h5"), "--format", "npz", "--out", os.path.join(folder, "e.npz"))
        cli("verify", os.path.join(folder, "m.h5"))
    print("DONE", len(np.load(os.path.join(folder, "e.npz")).files), flush=True)
    """


def test_captures_with_more_runs_than_open_files_read_merge_and_export(tmp_path):
    """Only so many run files stay open at once: a capture of 48 runs is read, analysed, merged, exported and
    verified by a process allowed 40 open files (each run file used to stay open until the capture closed)."""
    prelude = CHILD_PRELUDE + "cap = loopscope.attach(model, path)\nwith torch.no_grad():\n"
    prelude += "    for _ in range(6): model(torch.randint(3, 300, (8, 4)), num_steps=2)\ncap.close()\n"
    lines = _child_lines(prelude + textwrap.dedent(FEW_FILES_BODY), tmp_path / "c.h5")
    assert lines[0].split()[:3] == ["c.h5", "48", "48"] and lines[1].split()[:3] == ["m.h5", "48", "48"], lines
    assert lines[0].split()[3] == lines[1].split()[3], lines  # the merged capture reads the same states


def test_a_folder_listed_without_descriptors_left_is_no_permissions_problem(tmp_path, monkeypatch):
    """Running out of open files is said as such, with what to do, not as a permissions problem."""
    import errno

    from loopscope.errors import CaptureFileError
    from loopscope.storage import run_files

    (tmp_path / "c.h5.runs").mkdir()

    def listdir(path):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(CaptureFileError, match=r"Too many open files\); .*ulimit -n") as caught:
        run_files.list_run_files(str(tmp_path / "c.h5"))
    assert "permission" not in str(caught.value)


def _fill(folder, free: int) -> None:
    """Leave about ``free`` bytes free on the file system of ``folder``."""
    stat = os.statvfs(folder)
    with open(os.path.join(folder, "filler"), "wb") as filler:
        with contextlib.suppress(OSError):
            filler.write(b"\0" * max(stat.f_bavail * stat.f_frsize - free, 0))


def test_merge_onto_a_full_disk_is_one_line_and_keeps_what_force_would_replace(tmp_path, new_reference_model):
    """The disk fills while merge writes its run files or its index: one line naming the full disk (HDF5's flush
    of the index failed as a RuntimeError traceback), nothing left behind (no reserved empty run file to block
    the next merge), and with --force the capture being replaced is still there and reads as before (it was
    deleted before the new one was written)."""
    import torch

    model = new_reference_model()
    source = tmp_path / "src.h5"
    with loopscope.attach(model, source), torch.no_grad():
        model(torch.randint(3, 300, (40, 8)), num_steps=4)
    cli = [sys.executable, "-c", "from loopscope.cli.app import app; app()", "merge"]
    sizes = tmp_path / "sizes.h5"
    subprocess.run([*cli, str(sizes), str(source)], check=True, capture_output=True)
    run_bytes = sum(p.stat().st_size for p in (tmp_path / "sizes.h5.runs").iterdir())
    with _small_file_system(tmp_path, "2m") as mount:
        out = mount / "m.h5"
        for free in (8_000, run_bytes // 2, run_bytes, run_bytes + 8_000, run_bytes + 20_000, run_bytes + 40_000):
            for force in (False, True):
                for name in os.listdir(mount):
                    path = mount / name
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                if force:  # an existing merged capture, to be replaced
                    subprocess.run([*cli, str(out), str(tmp_path / "sizes.h5")], check=True, capture_output=True)
                    with loopscope.open(out) as old:
                        before = [run.states() for run in old.runs]
                _fill(mount, free)
                child = subprocess.run(
                    [*cli, str(out), str(source), *(["--force"] if force else [])],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                left = sorted(os.listdir(mount))
                if child.returncode == 0:  # enough space after all
                    continue
                lines = child.stderr.strip().splitlines()
                assert child.returncode == 1 and len(lines) == 1, (free, force, child.stderr[-3000:])
                assert re.fullmatch(
                    r"error: cannot write .*m\.h5 \(No space left on device\); free some space", lines[0]
                )
                if not force:
                    assert left == ["filler"], (free, left)
                    continue
                assert left == ["filler", "m.h5", "m.h5.runs"], (free, left)
                with loopscope.open(out) as old:
                    assert len(old.runs) == len(before) and sorted(os.listdir(f"{out}.runs")) == [
                        f"{n:06d}.h5" for n in range(len(before))
                    ]
                    for run, states in zip(old.runs, before):
                        np.testing.assert_array_equal(run.states(), states)


SHARED_RUNS_PRELUDE = CHILD_PRELUDE + textwrap.dedent(
    """
    import threading, numpy as np
    from loopscope.errors import LoopscopeError
    from loopscope.storage import open_runs
    ids = torch.randint(3, 300, (1, 16)).repeat(8, 1)  # one prompt: any run is a reference for the others
    cap = loopscope.attach(model, path)
    with torch.no_grad():
        for _ in range(6): model(ids, num_steps=4)
    cap.close()
    folder = os.path.dirname(path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))  # far fewer descriptors than the capture has runs
    """
)


def _shared_runs_child(tmp_path, body: str) -> list[str]:
    """Run ``body`` in a child that captured 48 runs to ``path`` and may then have 40 files open; its output."""
    return _child_lines(SHARED_RUNS_PRELUDE + textwrap.dedent(body), tmp_path / "c.h5")


def _child_lines(script: str, path) -> list[str]:
    """The output lines of ``script`` run in a child with ``path`` as its argument, which must end with DONE."""
    child = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and "DONE" in child.stdout, child.stdout + child.stderr[-3000:]
    return child.stdout.splitlines()


def test_threads_sharing_a_capture_read_every_run_while_run_files_close(tmp_path):
    """A run file closed to make room for another is never one a thread is reading (it was closed between a thread's
    lookup of the dataset and its read: "damaged or unreadable (invalid identifier type)")."""
    lines = _shared_runs_child(
        tmp_path,
        """
        capture = loopscope.open(path)
        runs = capture.runs
        expected = {run.index: float(np.nansum(run.states())) for run in runs}
        errors = []

        def work(k):
            try:
                for _ in range(20):
                    for run in runs[k::4]:
                        if float(np.nansum(run.states())) != expected[run.index]:
                            errors.append(f"run {run.index} read other values")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("ERRORS", len(errors), errors[:2])
        print("DONE")
        """,
    )
    assert "ERRORS 0 []" in lines, lines


def test_convergence_with_many_workers_under_few_open_files_matches_one_worker(tmp_path):
    """``--workers 8`` reads runs on threads that share the bounded set of open run files: same CSV as one worker
    (a worker's run file was closed under it: "damaged or unreadable (identifier is not of specified type)")."""
    _shared_runs_child(tmp_path, 'print("DONE")')
    cli = "import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (24, 24))\n"
    cli += "from loopscope.cli.app import app; sys.argv[0] = 'loopscope'; app()"
    for workers in (8, 1):
        args = ["convergence", "c.h5", "--out", f"w{workers}.csv", "--workers", str(workers), "--reference", "0"]
        child = subprocess.run(
            [sys.executable, "-c", cli, *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
        )
        assert child.returncode == 0, (workers, child.stdout[-1500:] + child.stderr[-1500:])
    one, eight = ((tmp_path / f"w{w}.csv").read_text() for w in (1, 8))
    assert one == eight and len(one.splitlines()) == 3841  # a row per run, token and step


def test_a_dataset_handed_out_stays_readable_after_more_runs_than_open_files_were_read(tmp_path):
    """``Run.dataset()`` hands out an h5py object: its run's file is not closed while that object lives (it died
    with a raw RuntimeError once more runs than the limit had been read)."""
    lines = _shared_runs_child(
        tmp_path,
        """
        capture = loopscope.open(path)
        first = capture.runs[0]
        expected = first.states(raw=True)
        ds = first.dataset()
        total = sum(float(np.nansum(run.states())) for run in capture.runs[1:])  # every other run's file opens
        print("READABLE", np.array_equal(ds[()], expected, equal_nan=True))
        del ds
        total = sum(float(np.nansum(run.states())) for run in capture.runs[1:])
        print("CLOSED", first._group is None and len(open_runs._open) <= open_runs.limit())  # let go once collected
        print("DONE")
        """,
    )
    assert "READABLE True" in lines and "CLOSED True" in lines, lines


def test_a_merged_run_closed_and_opened_again_checks_its_sources_again(tmp_path):
    """A merged run whose file was closed to make room for others checks its sources when it opens again: a source
    captured again meanwhile is refused (it was read silently, since the merged run's own file had not changed)."""
    lines = _shared_runs_child(
        tmp_path,
        """
        from loopscope.storage import merge
        import shutil
        open_runs.MAX_OPEN = 2  # two run files open at most: reading the others closes run 0's
        merge.merge(os.path.join(folder, "m.h5"), [path])
        other = os.path.join(folder, "other.h5")
        cap = loopscope.attach(model, other)
        with torch.no_grad():
            for _ in range(6): model(torch.randint(3, 300, (8, 16)), num_steps=4)
        cap.close()
        merged = loopscope.open(os.path.join(folder, "m.h5"))
        run = merged.runs[0]
        run.states()
        for later in merged.runs[1:]:
            later.states()
        print("CLOSED", run._group is None)
        shutil.rmtree(path + ".runs")
        shutil.copytree(other + ".runs", path + ".runs")  # the source captured again, as mode="w" would
        shutil.copy(other, path)
        try:
            run.states()
            print("READ")
        except LoopscopeError as exc:
            print("REFUSED", "no longer the one merged" in str(exc) and "\\n" not in str(exc))
        print("DONE")
        """,
    )
    assert "CLOSED True" in lines and "REFUSED True" in lines, lines
