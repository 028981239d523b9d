"""Where HDF5 finds a virtual dataset's source file, and that loopscope follows the same file everywhere.

HDF5 tries, for a relative source name, each folder of ``HDF5_VDS_PREFIX`` first, then the folder of the file
holding the virtual dataset (as opened: ``..`` is resolved by the OS, after symlinks), then the working directory.
The readers, ``verify``, the cycle walk and what ``export`` and ``merge`` refuse to destroy must all follow the file
HDF5 really reads, or a check passes on one file while HDF5 reads (or a command overwrites) another.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from capture_copies import copy_capture as _copy
from child_runs import run_script

import loopscope
from loopscope.errors import LoopscopeError, MergeError
from loopscope.storage import safety
from loopscope.storage.export import export
from loopscope.storage.merge import merge
from loopscope.storage.verify import verify_capture

MARK = 1234.5
PREFIX = "HDF5_VDS_PREFIX"
STATES = "loops/core/states"
CHILD = r"""
import sys
from loopscope.errors import LoopscopeError
try:
    import loopscope
    with loopscope.open(sys.argv[1]) as capture:
        for run in capture.runs:
            run.states()
    print("ok")
except LoopscopeError as exc:
    print("error:", exc)
"""


def _run_file(path: Path, number: int = 0) -> Path:
    return Path(str(path) + ".runs") / f"{number:06d}.h5"


def _mark(capture: Path) -> None:
    """Make run 0 of ``capture`` tell itself apart from the copy it was made from."""
    with h5py.File(_run_file(capture), "r+") as f:
        f[STATES][0, 0, 0] = MARK


def _first_state(merged: Path) -> float:
    """What plain HDF5 reads for run 0's first state value (the fill value, NaN, when no source is found)."""
    with h5py.File(_run_file(merged), "r") as f:
        return float(f[STATES][0, 0, 0])


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_hdf5_vds_prefix_moves_what_is_read_checked_and_protected(pristine, tmp_path, monkeypatch):
    """With HDF5_VDS_PREFIX set, HDF5 reads a merged run's source from the prefix's folder: the missing-source and
    cycle checks look there, and export and merge refuse to destroy that file (they protected the one beside)."""
    home = _copy(pristine, tmp_path / "home")
    merged = tmp_path / "home" / "all.h5"
    merge(merged, [home])  # maps ../cap.h5.runs/00000N.h5, relative to home/all.h5.runs
    other = _copy(pristine, tmp_path / "other")
    _mark(other)
    (tmp_path / "other" / "prefix").mkdir()
    monkeypatch.setenv(PREFIX, str(tmp_path / "other" / "prefix"))  # prefix/../cap.h5.runs: other's
    assert _first_state(merged) == MARK  # what HDF5 itself reads
    read = safety.mapped_file(str(_run_file(merged)), "../cap.h5.runs/000000.h5")
    assert os.path.samefile(read, _run_file(other))

    # export and merge --force refuse to destroy the file HDF5 reads through the prefix.
    os.symlink(_run_file(other), tmp_path / "out.npz")
    before = _hashes(tmp_path)
    with loopscope.open(merged) as capture:
        assert capture.runs[0].states()[0, 0, 0] == MARK
        with pytest.raises(LoopscopeError, match=r"out\.npz is \S*other/cap\.h5\.runs/000000\.h5 \(a file that"):
            export(capture, tmp_path / "out.npz", "npz")
    with pytest.raises(MergeError, match=r"would delete the run files of \S*other/cap\.h5, but .* maps"):
        merge(other, [merged], force=True)
    assert _hashes(tmp_path) == before

    # A source gone from beside the merged file is no loss while the prefix holds it; gone from both, it is missing.
    shutil.rmtree(str(home) + ".runs")
    with loopscope.open(merged) as capture:
        assert capture.runs[0].states()[0, 0, 0] == MARK
    assert not verify_capture(str(merged)).damaged
    shutil.rmtree(str(other) + ".runs")
    with loopscope.open(merged) as capture, pytest.raises(MergeError, match=r"other/cap\.h5\.runs/000000\.h5.*missing"):
        capture.runs[0].states()


def test_a_cycle_through_the_vds_prefix_is_refused(pristine, tmp_path):
    """The prefix leads run 0 back to the merged run file itself: HDF5 would recurse until the process crashed."""
    home = _copy(pristine, tmp_path / "home")
    merged = tmp_path / "home" / "all.h5"
    merge(merged, [home])
    (tmp_path / "other" / "cap.h5.runs").mkdir(parents=True)
    (tmp_path / "other" / "prefix").mkdir()
    os.symlink(_run_file(merged), tmp_path / "other" / "cap.h5.runs" / "000000.h5")
    env = {PREFIX: str(tmp_path / "other" / "prefix")}
    code, out, err = run_script(CHILD, merged, timeout=60, env=env)
    assert code == 0 and re.search(r"map themselves .*\(a cycle of virtual datasets\)", out), (code, out, err)


def test_a_merged_capture_reached_through_a_symlinked_folder(pristine, tmp_path):
    """``..`` in a mapping is resolved after the symlink: opened as link/all.h5 (link -> real/sub), the mapping
    ../../cap.h5.runs/... reads real/cap.h5.runs, not the decoy tmp/cap.h5.runs that the path's text suggests."""
    source = _copy(pristine, tmp_path / "real")
    (tmp_path / "real" / "sub").mkdir()
    merge(tmp_path / "real" / "sub" / "all.h5", [source])
    os.symlink(tmp_path / "real" / "sub", tmp_path / "link")
    decoy = _copy(pristine, tmp_path)
    _mark(decoy)
    merged = tmp_path / "link" / "all.h5"
    with loopscope.open(merged) as capture, loopscope.open(source) as original:
        np.testing.assert_array_equal(capture.runs[0].states(), original.runs[0].states())
    shutil.rmtree(str(source) + ".runs")  # HDF5 now reads NaN: the decoy is not where it looks
    assert np.isnan(_first_state(merged))
    with loopscope.open(merged) as capture, pytest.raises(MergeError, match=r"real/cap\.h5\.runs/000000\.h5.*missing"):
        capture.runs[0].states()
    findings = verify_capture(str(merged)).damaged
    assert findings and all("source file missing" in f.problem for f in findings)


def test_merge_into_a_symlinked_folder_maps_its_sources(pristine, tmp_path):
    """The mapping is written between real paths: HDF5 joins it to the folder as opened and the OS resolves ``..``
    after the symlink, so a path relative to the symlink's own name would miss (and read NaN)."""
    source = _copy(pristine, tmp_path / "src")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    os.symlink(tmp_path / "deep" / "er", tmp_path / "link")
    merged = tmp_path / "link" / "all.h5"
    merge(merged, [source])
    with loopscope.open(source) as original:
        expected = original.runs[0].states()
    with h5py.File(_run_file(merged), "r") as f:
        np.testing.assert_array_equal(f[STATES][()], expected)
    with loopscope.open(merged) as capture:
        np.testing.assert_array_equal(capture.runs[0].states(), expected)


def test_a_source_captured_again_since_the_merge_is_refused(pristine, tmp_path):
    """Each merged run records the capture id and run number of the source run file it maps: a source captured
    again over the old one (same shapes, another capture id), or its run files renamed, is an error, not states of
    other tokens read silently beside the token ids copied at the merge."""
    source = _copy(pristine, tmp_path / "src")
    merged = tmp_path / "all.h5"
    merge(merged, [source])
    with h5py.File(_run_file(merged), "r") as f, h5py.File(_run_file(source), "r") as src:
        assert f.attrs["source_capture_id"] == src.attrs["capture_id"] and f.attrs["source_run_number"] == 0
    with h5py.File(_run_file(source), "r+") as f:
        f.attrs["capture_id"] = np.bytes_(b"f" * 32)  # what mode="w" over the old capture gives run 0
    stale = r"source run .*src/cap\.h5\.runs/000000\.h5 is no longer the one merged.*; merge again"
    with loopscope.open(merged) as capture:
        with pytest.raises(MergeError, match=stale):
            capture.run(0).states()
        assert capture.run(1).states().size  # run 1 maps an untouched source run
    findings = verify_capture(str(merged)).damaged
    assert [f.run for f in findings] == [0] and "no longer the one merged" in findings[0].problem
    again = tmp_path / "again.h5"
    merge(again, [_copy(pristine, tmp_path / "src2")])
    with h5py.File(_run_file(tmp_path / "src2" / "cap.h5"), "r+") as f:
        f.attrs["run_number"] = 1  # the same capture, but another run's file under run 0's name
    with loopscope.open(again) as capture, pytest.raises(MergeError, match="no longer the one merged"):
        capture.run(0).states()
