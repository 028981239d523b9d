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
from pathlib import Path

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
    """``--run 0 --run -2`` of two runs names run 0 twice: exported once (each name twice was a safetensors file no
    reader loads, and an npz with duplicate members)."""
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
    assert proc.returncode == 0 and "from 1 run(s)" in proc.stdout, proc.stdout + proc.stderr


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


def _source_index_as_tmp(tmp_path: Path) -> list[str]:
    _copy(tmp_path / "cap.h5", tmp_path, "out.h5.tmp")  # the merge writes its index as OUT.tmp, then renames it
    return ["merge", "out.h5", "out.h5.tmp"]


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
    "its index is written over a source": (_source_index_as_tmp, r"out\.h5\.tmp is the index of capture out\.h5\.tmp"),
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
