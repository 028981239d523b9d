"""`loopscope export` and `loopscope merge` never write over or delete what their inputs read.

An export streams from the capture while it writes, and a merged capture's states live in other captures' run
files, reached through virtual datasets: an output that is (or, with ``merge --force``, would delete) the input's
index, a run file, a file in its run folder, or a file its runs map destroys data. Each case here is refused with
one line and exit code 1, and every file in the folder is byte-identical afterwards. Commands run in a child
process: before these checks, the damage they did made HDF5 crash the process that read the result.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
from capture_copies import copy_capture as _copy

import loopscope
from loopscope.errors import LoopscopeError, MergeError
from loopscope.storage.export import export
from loopscope.storage.merge import merge

TIMEOUT = 120
CHILD = "from loopscope.cli.app import app; app()"
OTHER_OUT = "choose another --out"
NEW_FILE = "write the merged capture to a new file"


def _run_file(path: Path, number: int) -> Path:
    return Path(str(path) + ".runs") / f"{number:06d}.h5"


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: a file's SHA-256, a link's target, or 'dir'."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            if os.path.islink(path):
                found[key] = "link -> " + os.readlink(path)
            elif name in dirs:
                found[key] = "dir"
            else:
                found[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    env["COLUMNS"] = "300"
    command = [sys.executable, "-c", CHILD, *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, env=env)


def _refused(folder: Path, pattern: str, *args) -> str:
    """Run the command in ``folder``; it must fail with one matching error line and leave every byte there as it was."""
    before = _tree(folder)
    proc = _cli(*args, cwd=folder)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), proc.stderr
    assert _tree(folder) == before
    return lines[0]


def _readable(path: Path) -> None:
    with loopscope.open(path) as capture:
        for run in capture.runs:
            assert run.states().size > 0


# ---- export ----------------------------------------------------------------------------------------------------------
TARGETS = {
    "index": (lambda cap: cap.name, r"--out cap\.h5 is the index of capture cap\.h5"),
    "run file": (lambda cap: "cap.h5.runs/000001.h5", r"cap\.h5\.runs/000001\.h5 is a run file of capture cap\.h5"),
    "partial run file": (lambda cap: "cap.h5.runs/000002.partial.h5", "a run file of capture cap.h5"),
    "run folder": (lambda cap: "cap.h5.runs", r"cap\.h5\.runs is the run folder of capture cap\.h5"),
    "new file in the run folder": (lambda cap: "cap.h5.runs/cap.npz", r"is inside cap\.h5\.runs"),
    "symlink to the index": (lambda cap: _link(cap.parent, "link.bin", cap.name, os.symlink), r"\(the index of"),
    "hard link to a run file": (lambda cap: _link(cap.parent, "hard.bin", _run_file(cap, 0), os.link), "run file"),
}


def _link(folder: Path, name: str, target, make) -> str:
    make(target, folder / name)
    return name


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("target", list(TARGETS))
def test_export_refuses_an_out_that_the_capture_reads(pristine, tmp_path, fmt, target):
    cap = _copy(pristine, tmp_path)
    shutil.copyfile(_run_file(cap, 0), _run_file(cap, 2).with_suffix(".partial.h5"))  # a run cut short
    name, pattern = TARGETS[target]
    out = name(cap)
    line = _refused(tmp_path, pattern, "export", cap.name, "--format", fmt, "--out", out)
    assert OTHER_OUT in line
    _readable(cap)


def test_export_api_refuses_the_same(pristine, tmp_path):
    cap = _copy(pristine, tmp_path)
    os.link(_run_file(cap, 1), tmp_path / "hard.safetensors")
    before = _tree(tmp_path)
    with loopscope.open(cap) as capture:
        for out, fmt in ((cap, "npz"), (tmp_path / "hard.safetensors", "safetensors"), (_run_file(cap, 0), "npz")):
            with pytest.raises(LoopscopeError, match=OTHER_OUT):
                export(capture, out, fmt)
    assert _tree(tmp_path) == before


def test_export_of_a_run_named_twice_writes_it_once(pristine, tmp_path):
    """``runs=[0, -2]`` of two runs names run 0 twice: exported once (each name twice was a safetensors file no
    reader loads, and an npz with duplicate members); ``export --run 1 --run -1`` is refused in one line."""
    import zipfile

    from safetensors.numpy import load_file

    with loopscope.open(pristine) as capture:
        names = export(capture, tmp_path / "e.safetensors", "safetensors", runs=[0, -2, 1, 0])
        assert len(names) == len(set(names)) and names[0].startswith("runs/000000/")
        assert any(name.startswith("runs/000001/") for name in names)
        export(capture, tmp_path / "e.npz", "npz", runs=[0, -2])
    assert sorted(load_file(tmp_path / "e.safetensors")) == sorted(names)
    members = zipfile.ZipFile(tmp_path / "e.npz").namelist()
    assert len(members) == len(set(members))
    proc = _cli(
        "export", pristine, "--format", "npz", "--run", "1", "--run", "-1", "--out", tmp_path / "c.npz", cwd=tmp_path
    )
    # the command line refuses it, as every command with a repeatable --run does: a run given twice is a slip
    assert proc.returncode == 1 and "--run 1 and --run -1 both name run 1" in proc.stderr, proc.stdout + proc.stderr
    assert not (tmp_path / "c.npz").exists()


def test_export_default_out_that_is_the_capture_itself(pristine, tmp_path):
    """Without --out the export goes to FILE with the format's suffix: for a capture named cap.npz, cap.npz."""
    cap = _copy(pristine, tmp_path, "cap.npz")
    _refused(tmp_path, r"cap\.npz is the index of capture cap\.npz", "export", cap.name, "--format", "npz")
    _readable(cap)


def test_export_of_a_merged_capture_refuses_the_files_it_maps(pristine, tmp_path):
    cap = _copy(pristine, tmp_path / "src")
    merged = tmp_path / "m.h5"
    merge(merged, [cap])
    os.symlink(_run_file(cap, 0), tmp_path / "elsewhere.npz")
    for out in ("src/cap.h5.runs/000000.h5", "src/cap.h5.runs/000001.h5", "elsewhere.npz"):
        line = _refused(tmp_path, r"a file that capture m\.h5 maps", "export", "m.h5", "--format", "npz", "--out", out)
        assert OTHER_OUT in line
    _readable(merged)
    # Names that merely start like a protected one are free to use.
    for out in ("src/cap.h5.runs.npz", "m.h5.runs.npz", "src/cap.h5.npz"):
        proc = _cli("export", "m.h5", "--format", "npz", "--out", out, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    _readable(merged)


# ---- merge -----------------------------------------------------------------------------------------------------------
def test_merge_force_refuses_to_replace_a_capture_that_a_source_maps(pristine, tmp_path):
    cap = _copy(pristine, tmp_path)
    merge(tmp_path / "m.h5", [cap])  # m.h5's states are cap.h5's run files
    merge(tmp_path / "m2.h5", [tmp_path / "m.h5"])  # a merge of the merge maps them through m.h5
    for source in ("m.h5", "m2.h5"):
        line = _refused(tmp_path, "would delete the run files of cap.h5", "merge", "cap.h5", source, "--force")
        assert re.search(r"cap\.h5\.runs/00000[01]\.h5 is a file that capture m2?\.h5 maps", line), line
        assert NEW_FILE in line
    with pytest.raises(MergeError, match=r"cap\.h5\.runs/00000[01]\.h5 is a file that capture \S*m\.h5 maps"):
        merge(cap, [tmp_path / "m.h5"], force=True)
    for path in (cap, tmp_path / "m.h5", tmp_path / "m2.h5"):
        _readable(path)


def _runs_folder_linked(tmp_path: Path) -> list[str]:
    os.symlink("cap.h5.runs", tmp_path / "out.h5.runs")  # out.h5's run folder is the source's
    return ["merge", "out.h5", "cap.h5", "--force"]


def _source_index_as_lock(tmp_path: Path) -> list[str]:
    _copy(tmp_path / "cap.h5", tmp_path, "out.h5.merge.lock")  # the merge locks OUT.merge.lock, then removes it
    return ["merge", "out.h5", "out.h5.merge.lock"]


def _hard_link_to_index(tmp_path: Path) -> list[str]:
    os.link(tmp_path / "cap.h5", tmp_path / "out.h5")
    return ["merge", "out.h5", "cap.h5", "--force"]


MERGE_CASES = {
    "a run file, --force": (
        lambda tmp: ["merge", "cap.h5.runs/000001.h5", "cap.h5", "--force"],
        r"output cap\.h5\.runs/000001\.h5 is a run file of capture cap\.h5",
    ),
    "a run file": (lambda tmp: ["merge", "cap.h5.runs/000001.h5", "cap.h5"], "is a run file of capture cap.h5"),
    "a new file in the run folder": (
        lambda tmp: ["merge", "cap.h5.runs/m.h5", "cap.h5"],
        r"output cap\.h5\.runs/m\.h5 is inside cap\.h5\.runs \(the run folder of capture cap\.h5\)",
    ),
    "its run folder is the source's": (_runs_folder_linked, r"out\.h5\.runs is cap\.h5\.runs \(the run folder of"),
    "its lock file is a source": (_source_index_as_lock, r"source out\.h5\.merge\.lock is where merging into out\.h5"),
    "a hard link to the source's index": (_hard_link_to_index, r"output out\.h5 is cap\.h5 \(the index of capture"),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_refuses_an_output_among_the_sources_files(pristine, tmp_path, case):
    cap = _copy(pristine, tmp_path)
    setup, pattern = MERGE_CASES[case]
    args = setup(tmp_path)
    line = _refused(tmp_path, pattern, *args)
    assert NEW_FILE in line
    _readable(cap)


def test_merge_refuses_sources_that_hold_the_same_runs(pristine, tmp_path):
    """A merged capture and one of the captures it maps, given together, would list that one's runs twice."""
    cap = _copy(pristine, tmp_path / "src")
    merge(tmp_path / "all.h5", [cap])
    pattern = r"sources all\.h5 and src/cap\.h5 hold the same runs .*merge each capture once"
    _refused(tmp_path, pattern, "merge", "twice.h5", "all.h5", "src/cap.h5")
    shutil.copyfile(cap, tmp_path / "copy.h5")  # a copied index whose run folder is a link to the same runs
    os.symlink(str(cap) + ".runs", tmp_path / "copy.h5.runs")
    _refused(
        tmp_path, r"sources src/cap\.h5 and copy\.h5 hold the same runs", "merge", "twice.h5", "src/cap.h5", "copy.h5"
    )


# ---- replacing a capture: never a mix of two, never both lost -------------------------------------------------------
KILL_CHILD = """
import os, signal, sys
from loopscope.storage import merge
calls, at = [0], int(sys.argv[1])
def counted(real):
    def rename(a, b):
        calls[0] += 1
        if calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    return rename
os.rename, os.replace = counted(os.rename), counted(os.replace)
merge.merge(sys.argv[2], sys.argv[3:], force=True)
"""


def _two_sources(pristine, tmp_path: Path) -> tuple[Path, list[Path], str]:
    """a.h5 and b.h5, and m.h5 merged from a.h5 alone (2 runs); returns m.h5, [a, b] and m.h5's capture id."""
    a, b = _copy(pristine, tmp_path, "a.h5"), _copy(pristine, tmp_path, "b.h5")
    merge(tmp_path / "m.h5", [a])
    return tmp_path / "m.h5", [a, b], _capture_id(tmp_path / "m.h5")


def _capture_id(path: Path) -> str:
    with h5py.File(path, "r") as file:
        value = file.attrs.get("capture_id")
    return value.decode() if isinstance(value, bytes) else str(value)


def _which(out: Path, old_id: str) -> str:
    """'old' (merged from a.h5), 'new' (from a.h5 and b.h5) or 'missing'; never an index beside other runs."""
    if not out.exists():
        return "missing"
    own = _capture_id(out)
    runs = sorted(Path(str(out) + ".runs").glob("*.h5"))
    assert runs and all(_capture_id(run) == own for run in runs), (own, [_capture_id(run) for run in runs])
    with loopscope.open(out) as capture:
        assert len(capture.runs) == (2 if own == old_id else 4)
        assert all(run.states().size > 0 for run in capture.runs)
    return "old" if own == old_id else "new"


@pytest.mark.parametrize("at", range(1, 10))
def test_an_interrupt_while_force_replaces_a_capture_leaves_one_whole_capture(pristine, tmp_path, monkeypatch, at):
    """Ctrl-C at any rename of ``merge --force`` (its runs put in place, the swap, its undoing) leaves the old
    capture or the new one, whole, and nothing of the other beside it."""
    out, sources, old_id = _two_sources(pristine, tmp_path)
    calls = [0]

    def counted(real):
        def rename(a, b):
            calls[0] += 1
            if calls[0] == at:
                raise KeyboardInterrupt
            return real(a, b)

        return rename

    monkeypatch.setattr(os, "rename", counted(os.rename))
    monkeypatch.setattr(os, "replace", counted(os.replace))
    try:
        merge(out, sources, force=True)
    except (KeyboardInterrupt, MergeError):
        assert at <= 8  # 4 run files renamed when written, then the 4 renames of the swap
    else:
        assert at > 8
    monkeypatch.undo()
    assert _which(out, old_id) == ("old" if at <= 8 else "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.h5.runs", "b.h5", "b.h5.runs", "m.h5", "m.h5.runs"]
    merge(out, sources, force=True)
    assert _which(out, old_id) == "new"


@pytest.mark.parametrize("at", [3, 5, 6, 7, 8])
def test_a_kill_while_force_replaces_a_capture_never_pairs_an_index_with_other_runs(pristine, tmp_path, at):
    """SIGKILL at a rename: the capture at OUT is the old one, the new one, or none (the swap under way); the next
    merge removes what was left of the new one, and names the old pieces with the commands that put them back."""
    out, sources, old_id = _two_sources(pristine, tmp_path)
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, str(at), str(out), *map(str, sources)], timeout=TIMEOUT)
    assert child.returncode == -9
    state = _which(out, old_id)
    assert state in ("old", "missing")
    try:
        merge(out, sources, force=True)
    except MergeError as exc:
        assert state == "missing" and "cut short" in str(exc) and len(str(exc).splitlines()) == 1
        for source, target in re.findall(r"\bmv (\S+) ([^\s;,]+)", str(exc)):
            os.rename(source, target)
        assert _which(out, old_id) == "old"
        merge(out, sources, force=True)
    assert _which(out, old_id) == "new"
    left = {p.name for p in tmp_path.iterdir()} - {"a.h5", "a.h5.runs", "b.h5", "b.h5.runs", "m.h5", "m.h5.runs"}
    assert not left, left


SLOW_CHILD = """
import pathlib, sys, time
from loopscope.storage import merge
real = merge._write_runs
def slow(*args, **kwargs):
    pathlib.Path(sys.argv[1]).touch()
    time.sleep(3)
    return real(*args, **kwargs)
merge._write_runs = slow
merge.merge(sys.argv[2], sys.argv[3:], force=True)
print("ok")
"""


def test_two_merges_into_one_output_at_once_refuse_the_second(pristine, tmp_path):
    out, (a, b), old_id = _two_sources(pristine, tmp_path)
    started = tmp_path / "started"
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_CHILD, str(started), str(out), str(a), str(b)], stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + TIMEOUT
    while not started.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(MergeError, match=r"^another merge is writing \S*m\.h5; wait for it to finish$"):
        merge(out, [a], force=True)
    assert first.communicate(timeout=TIMEOUT)[0].strip() == "ok"
    assert _which(out, old_id) == "new"
    assert not (tmp_path / "m.h5.merge.lock").exists()
