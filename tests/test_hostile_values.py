"""Crafted values inside otherwise sound captures: dtypes that decode to other numbers, attributes of the wrong
kind, names with terminal escapes, damaged chunks where a command would stop. Each is a one-line error (or, for
verify, a listed finding), never a traceback or silently wrong output, and no file already written is lost.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from capture_copies import copy_capture as _copy
from test_hostile_files import _child, _run_file, cli_error

import loopscope
from loopscope.errors import CaptureFileError, LoopscopeError, MergeError
from loopscope.storage.export import export
from loopscope.storage.merge import merge
from loopscope.storage.run import Run
from loopscope.storage.verify import verify_capture


def _flip(path: Path, dataset: str, chunk: int = -1, at: int = 4) -> None:
    """Flip one bit of a stored chunk (the last by default), as a bad disk sector would."""
    with h5py.File(path, "r") as f:
        ds = f[dataset]
        info = ds.id.get_chunk_info(chunk % ds.id.get_num_chunks())
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + at)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + at)
        fh.write(bytes([byte ^ 0x10]))


def _replace(path: Path, name: str, data: np.ndarray, **attrs) -> None:
    with h5py.File(path, "a") as f:
        del f[name]
        ds = f.create_dataset(name, data=data)
        for key, value in attrs.items():
            ds.attrs[key] = value


# ---- export ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_a_failed_export_keeps_the_file_already_there(pristine, tmp_path, fmt):
    path = _copy(pristine, tmp_path / "cap")
    _flip(_run_file(path, 1), "loops/core/states")  # the last run's last chunk: arrays were written before it
    out = tmp_path / f"out.{fmt}"
    out.write_bytes(b"an earlier export, keep me")
    with loopscope.open(path) as capture, pytest.raises(CaptureFileError, match="checksum"):
        export(capture, out, fmt)
    assert out.read_bytes() == b"an earlier export, keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cap", out.name]  # no partial file left behind

    whole = _copy(pristine, tmp_path / "whole")
    with loopscope.open(whole) as capture:
        names = export(capture, out, fmt)
    assert out.stat().st_size > 100 and not Path(f"{out}.partial").exists()
    if fmt == "npz":
        assert set(names) <= set(np.load(out).files)


def test_array_attributes_of_bytes_go_to_the_export_meta_as_text(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path, 0), "a") as f:
        f.attrs["call"] = np.array([b"generate", b"forward"])
        f.attrs["notes"] = np.array([b"ok", b"bad \xff"])
        f.attrs["sizes"] = np.arange(3)
        f.attrs.create("labels", np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype())
    with loopscope.open(path) as capture:
        export(capture, tmp_path / "e.npz", "npz", runs=[0])
    meta = json.loads(str(np.load(tmp_path / "e.npz")["meta"]))["runs"]["000000"]
    assert meta["call"] == ["generate", "forward"] and meta["notes"] == ["ok", "bad \ufffd"]
    assert meta["sizes"] == [0, 1, 2] and meta["labels"] == ["a", "b"]


def test_step_labels_that_are_not_integers_are_damaged(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path, 0), "a") as f:
        steps = f["loops/core/states"].shape[1]
        labels = np.array([["a", "b"]] * steps, dtype=object)
        f.create_dataset("loops/core/step_labels", data=labels, dtype=h5py.string_dtype())
    with loopscope.open(path) as capture, pytest.raises(CaptureFileError, match="step_labels has dtype object"):
        capture.runs[0].step_labels()
    cli_error("step_labels has dtype object", "export", path, "--format", "npz", "--out", tmp_path / "e.npz")
    assert not (tmp_path / "e.npz").exists()


def test_npz_export_refuses_arrays_of_python_objects(pristine, tmp_path, monkeypatch):
    path = _copy(pristine, tmp_path)
    strings = np.array([["a", "b"]], dtype=object)
    monkeypatch.setattr(Run, "step_labels", lambda self, loop=None: strings)  # whatever reaches the writer
    with loopscope.open(path) as capture, pytest.raises(LoopscopeError, match="step_labels: it holds Python objects"):
        export(capture, tmp_path / "e.npz", "npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.runs"]


@pytest.mark.parametrize("name", ["", "."])
def test_export_of_a_directory_is_one_line(tmp_path, name):
    cli_error(r"^error: \. is a directory", "export", name, "--format", "npz")


# ---- decoding --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stored", [np.uint8, np.uint32, np.uint64])
def test_bfloat16_states_must_be_stored_as_uint16(pristine, tmp_path, stored):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path, 0), "r") as f:
        shape = f["loops/core/states"].shape
    bits = np.full(shape, 0x3F80, np.uint64) | np.uint64(0x40000000)  # no bf16 bit pattern
    _replace(_run_file(path, 0), "loops/core/states", bits.astype(stored), logical_dtype=np.bytes_(b"bfloat16"))
    with loopscope.open(path) as capture, pytest.raises(CaptureFileError, match="with logical dtype 'bfloat16'"):
        capture.runs[0].states(token=0)


def test_float_states_must_be_stored_in_their_logical_dtype(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path, 0), "a") as f:
        f["loops/core/states"].attrs["logical_dtype"] = np.bytes_(b"float64")  # stored float32
    with loopscope.open(path) as capture:
        with pytest.raises(CaptureFileError, match="stored as float32 with logical dtype 'float64'"):
            capture.runs[0].logical_dtype()
        assert capture.runs[1].logical_dtype() == "float32"


def test_unsigned_token_ends_are_checked_as_numbers(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with loopscope.open(path) as capture:
        tokens = capture.runs[0].tokens
        ends = capture.runs[0]._array("token_ends")
    assert tokens and len(tokens) > 2
    _replace(_run_file(path, 0), "token_ends", ends.astype(np.uint64))
    with loopscope.open(path) as capture:
        assert capture.runs[0].tokens == tokens
    backwards = ends[::-1].copy()  # each end within token_bytes, decreasing: np.diff of uint32 wraps
    _replace(_run_file(path, 0), "token_ends", backwards.astype(np.uint32))
    with loopscope.open(path) as capture, pytest.raises(CaptureFileError, match="token_ends do not fit"):
        capture.runs[0].tokens
    _replace(_run_file(path, 0), "token_ends", np.full(len(ends), 2**63 + 5, np.uint64))
    with loopscope.open(path) as capture, pytest.raises(CaptureFileError, match="token_ends do not fit"):
        capture.runs[0].tokens


# ---- info and the Jupyter summary -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.array([b"generate", b"generate"]), np.arange(3), 7.5], ids=str)
def test_a_call_attribute_that_is_no_text_shows_as_unknown(pristine, tmp_path, value):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path, 0), "a") as f:
        f.attrs["call"] = value
    code, out, err = _child("cli", "info", path)
    assert code == 0 and "[" not in out.split("\n", 1)[1] and "7.5" not in out, out + err
    with loopscope.open(path) as capture:
        summary = capture.runs[0]._repr_html_()
    assert '<th style="text-align: left">call</th><td style="text-align: left">?</td>' in summary, summary[:400]


# ---- verify ----------------------------------------------------------------------------------------------------------
def test_verify_prints_names_and_paths_from_files_inert(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "dir\x1b[2J")
    with h5py.File(_run_file(path, 0), "a") as f:
        f.create_dataset("x\x1b]0;PWNED\x07\x1b[31m", data=np.arange(10))
    code, out, err = _child("cli", "verify", path)
    assert code == 0 and "\x1b" not in out + err and "\x07" not in out + err, out + err
    assert r"x\x1b]0;PWNED\x07\x1b[31m" in out and r"dir\x1b[2J" in out, out


def test_verify_lists_a_damaged_chunk_of_the_index(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _flip(path, "readout/weight", chunk=0)
    with pytest.raises(CaptureFileError, match="verify"):
        loopscope.open(path)
    result = verify_capture(path)
    assert [(f.run, f.dataset) for f in result.damaged] == [(None, "readout/weight")]
    assert result.files == 3  # the run files are checked too
    code, out, err = _child("cli", "verify", path)
    assert code == 1 and "readout/weight" in out and "checksum mismatch" in out, out + err
    assert err.strip().startswith("error: 1 damaged chunk"), err
    with h5py.File(path, "a") as f:  # a file that is no capture is still said to be one, damaged chunk or not
        del f.attrs["format"]
    with pytest.raises(CaptureFileError, match="not a loopscope capture"):
        verify_capture(path)


# ---- merge -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [np.bytes_(b"abc"), float("nan"), np.arange(3)], ids=["text", "nan", "array"])
def test_merge_names_a_source_whose_rank_is_no_integer(pristine, tmp_path, value):
    a, b = _copy(pristine, tmp_path / "a"), _copy(pristine, tmp_path / "b")
    with h5py.File(b, "a") as f:
        f.attrs["rank"] = value
    out = tmp_path / "merged.h5"
    with pytest.raises(MergeError, match=f"source {b}: rank .* is not an integer"):
        merge(out, [a, b])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_merge_names_a_source_whose_model_class_is_no_text(pristine, tmp_path):
    a, b = _copy(pristine, tmp_path / "a"), _copy(pristine, tmp_path / "b")
    with h5py.File(b, "a") as f:
        f.attrs["model_class"] = np.arange(3)
    with pytest.raises(MergeError, match=f"source {b}: model_class .* is not text"):
        merge(tmp_path / "merged.h5", [a, b])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_failed_merge_removes_the_run_folder_it_made(pristine, tmp_path):
    a, b = _copy(pristine, tmp_path / "a"), _copy(pristine, tmp_path / "b")
    _flip(_run_file(b, 1), "token_ids", chunk=0, at=0)  # read only when the merge copies it
    with pytest.raises(MergeError, match="damaged"):
        merge(tmp_path / "merged.h5", [a, b])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]

    os.mkdir(tmp_path / "merged.h5.runs")  # a folder that was there before the merge stays
    with pytest.raises(MergeError):
        merge(tmp_path / "merged.h5", [a, b], force=True)
    assert (tmp_path / "merged.h5.runs").is_dir()


def test_a_failed_merge_force_keeps_the_capture_it_would_replace(pristine, tmp_path):
    """``force`` replaces the output only once the new capture is whole: a merge that fails on the way (a damaged
    source here, a full disk in test_reliability) leaves the old one as it was (it was deleted first), and no
    staging file behind."""
    a, b = _copy(pristine, tmp_path / "a"), _copy(pristine, tmp_path / "b")
    merged = tmp_path / "merged.h5"
    merge(merged, [a])
    with loopscope.open(merged) as capture:
        before = [run.states() for run in capture.runs]
    files = sorted(os.listdir(f"{merged}.runs"))
    _flip(_run_file(b, 1), "token_ids", chunk=0, at=0)  # read only when the merge copies it, after run 0 of b
    with pytest.raises(MergeError, match="damaged"):
        merge(merged, [b, a], force=True)
    assert sorted(os.listdir(f"{merged}.runs")) == files and not (tmp_path / "merged.h5.tmp").exists()
    with loopscope.open(merged) as capture:
        assert len(capture.runs) == len(before)
        for run, states in zip(capture.runs, before):
            np.testing.assert_array_equal(run.states(), states)
    summary = merge(merged, [_copy(pristine, tmp_path / "c"), a], force=True)  # the old runs replaced
    assert summary.runs == 4 and sorted(os.listdir(f"{merged}.runs")) == [f"{n:06d}.h5" for n in range(4)]


def test_a_run_file_that_cannot_be_created_leaves_no_reserved_file(tmp_path, monkeypatch):
    """The run number is reserved as an empty ``NNNNNN.partial.h5`` before HDF5 creates the file; when that fails
    (a full disk) the reservation goes too: it stood as a run cut short, and made the next merge say the output
    already exists."""
    from loopscope.storage import run_files

    (tmp_path / "c.h5.runs").mkdir()
    files = run_files.RunFiles(str(tmp_path / "c.h5"), capture_id="0" * 32)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_files.h5py, "File", full)
    with pytest.raises(OSError, match="No space"):
        files.create_run(0)
    assert os.listdir(tmp_path / "c.h5.runs") == [] and run_files.list_run_files(str(tmp_path / "c.h5")) == {}
