"""Crafted files: what a file declares is checked against what it holds, special files never block, strings from
files are inert text, and run files that are missing or belong elsewhere are named.

Every check runs in a real child process under an address-space limit (``RLIMIT_AS``, 2.5 GB above the process's
size after its imports) and a timeout, so a MemoryError, an allocation of gigabytes, or a hang fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from capture_copies import copy_capture as _copy
from child_runs import run_script

import loopscope
from loopscope.errors import LoopscopeError
from loopscope.storage.merge import merge
from loopscope.storage.verify import verify_capture

TIMEOUT = 60
CHILD = r"""
import os, resource, sys
import h5py, numpy
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import loopscope
from loopscope.analysis import token_metrics
from loopscope.cli.app import app
from loopscope.errors import LoopscopeError

def vm_size():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

limit = vm_size() + 2_500_000_000
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
mode, *args = sys.argv[1:]
if mode == "cli":
    sys.argv = ["loopscope", *args]
    app()
path, options = args[0], ({"missing": args[1]} if len(args) > 1 else {})
try:
    with loopscope.open(path, **options) as capture:
        capture.meta
        for run in capture.runs:
            run.token_ids, run.tokens, run.positions, run.attention_mask, run.forward_index, run.step_stride
            for loop in run.loops:
                run.states(loop=loop)
                token_metrics(run, loop=loop)
                for name in run.signal_names(loop):
                    run.signal(name, loop)
    print("ok")
except LoopscopeError as exc:
    print("error:", exc)
"""


def _child(*args) -> tuple[int, str, str]:
    code, out, err = run_script(CHILD, *args, timeout=TIMEOUT)
    assert "Traceback" not in out + err and "MemoryError" not in out + err, out + err
    return code, out, err


def api_error(path: Path, pattern: str) -> None:
    code, out, err = _child("api", path)
    assert code == 0 and out.startswith("error:") and re.search(pattern, out), out + err


def cli_error(pattern: str, *args) -> str:
    code, out, err = _child("cli", *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), out + err
    return lines[0]


def cli_ok(*args) -> str:
    code, out, err = _child("cli", *args)
    assert code == 0, out + err
    return out


def _run_file(path: Path, number: int = 0) -> Path:
    return Path(str(path) + ".runs") / f"{number:06d}.h5"


def _declare_tokens(run: Path, tokens: int, *, external: bool = False, k: int | None = None) -> None:
    """Replace run 0's token data, step counts and states with datasets declaring ``tokens`` tokens and holding
    nothing (fill), or, with ``external``, stored on /dev/zero."""
    with h5py.File(run, "a") as f:
        for name in ("token_ids", "attention_mask", "positions", "forward_index", "token_ends", "token_bytes"):
            if name in f:
                del f[name]
        for name, dtype in (
            ("token_ids", np.int64),
            ("attention_mask", np.int8),
            ("positions", np.int64),
            ("forward_index", np.int32),
        ):
            if external:
                size = tokens * np.dtype(dtype).itemsize
                f.create_dataset(name, shape=(tokens,), dtype=dtype, external=[("/dev/zero", 0, size)])
            else:
                f.create_dataset(name, shape=(tokens,), maxshape=(None,), dtype=dtype, chunks=(1024,))
        loop = f["loops/core"]
        states = loop["states"]
        hidden, dtype, steps = states.shape[2], states.dtype, states.shape[1] if k is None else k
        del loop["states"], loop["num_steps"]
        loop.create_dataset("num_steps", shape=(tokens,), maxshape=(None,), dtype=np.int32, chunks=(1024,))
        loop.create_dataset(
            "states",
            shape=(tokens, steps, hidden),
            maxshape=(None, None, hidden),
            dtype=dtype,
            chunks=(16, 4, hidden),
            fillvalue=np.nan,
        )


@pytest.mark.parametrize("tokens", [2**24, 2**40])
def test_huge_declared_token_counts_are_refused_before_reading(pristine, tmp_path, tokens):
    path = _copy(pristine, tmp_path)
    _declare_tokens(_run_file(path), tokens)
    api_error(path, "declares .* bytes|declares shape|damaged")
    cli_error("000000.h5.*(declares|damaged)", "plot", path, "--run", "0", "--out", tmp_path / "x.png")
    assert "damaged" in cli_ok("info", path)  # the other run is still listed


def test_token_data_on_dev_zero_is_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _declare_tokens(_run_file(path), 2**24, external=True)
    api_error(path, "external storage")
    cli_error("external storage", "plot", path, "--run", "0", "--out", tmp_path / "x.png")
    _refused_readout_weight(
        pristine, tmp_path / "index", "external storage", shape=(2**20,), external=[("/dev/zero", 0, 2**22)]
    )


def _refused_readout_weight(pristine, folder, message, **dataset):
    """A copy whose /readout/weight is replaced by ``dataset``: the API and `info` refuse it with ``message``."""
    index = _copy(pristine, folder)
    with h5py.File(index, "a") as f:
        del f["readout/weight"]
        f["readout"].create_dataset("weight", dtype=np.float32, **dataset)
    api_error(index, message)
    cli_error(message, "info", index)


def test_huge_hidden_size_token_bytes_and_readout_weight(pristine, tmp_path):
    wide = _copy(pristine, tmp_path / "wide")
    with h5py.File(_run_file(wide), "a") as f:
        loop = f["loops/core"]
        t, k, _ = loop["states"].shape
        del loop["states"]
        loop.create_dataset("states", shape=(t, k, 2**28), dtype=np.float32, chunks=(1, 1, 2**28), fillvalue=np.nan)
    api_error(wide, "declares shape|damaged")
    cli_error("damaged", "plot", wide, "--run", "0", "--out", tmp_path / "x.png")

    text = _copy(pristine, tmp_path / "text")
    with h5py.File(_run_file(text), "a") as f:
        del f["token_bytes"]
        f.create_dataset("token_bytes", shape=(2**40,), maxshape=(None,), dtype=np.uint8, chunks=(2**16,))
    api_error(text, "token_bytes declares")
    cli_error("token_bytes declares", "plot", text, "--run", "0", "--out", tmp_path / "x.png")

    _refused_readout_weight(
        pristine, tmp_path / "weight", "readout weight", shape=(2**34,), maxshape=(None,), chunks=(2**16,)
    )


def test_fill_and_gzip_bombs_are_refused(pristine, tmp_path):
    fill = _copy(pristine, tmp_path / "fill")
    with h5py.File(_run_file(fill), "a") as f:
        loop = f["loops/core"]
        t, _, h = loop["states"].shape
        del loop["states"]
        loop.create_dataset(
            "states",
            shape=(t, 2**19, h),
            maxshape=(None, None, h),
            dtype=np.float32,
            chunks=(16, 16, h),
            fillvalue=np.nan,
        )
    api_error(fill, "states declares .* but stores")
    cli_error("states declares", "plot", fill, "--run", "0", "--out", tmp_path / "x.png")

    bomb = _copy(pristine, tmp_path / "bomb")
    with h5py.File(_run_file(bomb), "a") as f:
        del f["token_bytes"]
        ds = f.create_dataset("token_bytes", shape=(2**28,), dtype=np.uint8, chunks=(2**20,), compression="gzip")
        zeros = zlib.compress(bytes(2**20))
        for start in range(0, 2**28, 2**20):
            ds.id.write_direct_chunk((start,), zeros, filter_mask=0)
    api_error(bomb, "token_bytes declares .* but stores")
    cli_error("token_bytes declares", "plot", bomb, "--run", "0", "--out", tmp_path / "x.png")


def test_tiny_chunks_over_a_large_dataset_are_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path), "a") as f:
        loop = f["loops/core"]
        t, _, h = loop["states"].shape
        del loop["states"]
        loop.create_dataset("states", shape=(t, 2**16, h), dtype=np.float32, chunks=(1, 1, 8), fillvalue=np.nan)
        loop["states"][:, :8] = 0  # some chunks stored
    api_error(path, "has chunks")


@pytest.mark.parametrize("where", ["index", "run", "symlink", "readout link", "run link", "vds source"])
def test_special_files_are_refused_without_blocking(pristine, tmp_path, where):
    path = _copy(pristine, tmp_path / "cap")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plot = ("plot", path, "--run", "0", "--out", tmp_path / "x.png")
    if where == "index":
        os.mkfifo(tmp_path / "index.h5")
        api_error(tmp_path / "index.h5", "not a regular file")
        cli_error("not a regular file", "info", tmp_path / "index.h5")
        return
    if where in ("run", "symlink"):
        _run_file(path).unlink()
        os.mkfifo(_run_file(path)) if where == "run" else os.symlink("/dev/zero", _run_file(path))
        pattern = "not a regular file"
    elif where == "readout link":
        with h5py.File(path, "a") as f:
            del f["readout"]
            f["readout"] = h5py.ExternalLink(str(fifo), "/")
        pattern = "readout is a link"
        plot = ("info", path)
    elif where == "run link":
        with h5py.File(_run_file(path), "a") as f:
            del f["positions"]
            f["positions"] = h5py.ExternalLink(str(fifo), "/positions")
        pattern = "positions is a link"
    else:
        merged = tmp_path / "merged.h5"
        merge(merged, [path])
        _run_file(path).unlink()
        os.mkfifo(_run_file(path))
        pattern = "not a regular file"
        path, plot = merged, ("plot", merged, "--run", "0", "--out", tmp_path / "x.png")
    api_error(path, pattern)
    cli_error(pattern, *plot)


def _set_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "a") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def test_deep_json_and_huge_step_stride(pristine, tmp_path):
    deep = _copy(pristine, tmp_path / "deep")
    _set_attrs(deep, config_json=np.bytes_(b"[" * 100_000 + b"]" * 100_000))
    assert cli_ok("info", deep)
    with loopscope.open(deep) as capture:
        assert isinstance(capture.meta["config_json"], str)  # kept as its text
    _set_attrs(deep, loops_json=np.bytes_(b"[" * 100_000 + b"]" * 100_000))
    api_error(deep, "loops_json attribute is damaged")
    cli_error("loops_json", "info", deep)

    stride = _copy(pristine, tmp_path / "stride")
    _set_attrs(_run_file(stride), step_stride=np.int64(2**62))
    api_error(stride, "step_stride .* damaged")
    cli_error("step_stride", "plot", stride, "--run", "0", "--out", tmp_path / "x.png")
    assert "damaged" in cli_ok("info", stride)


def test_markup_in_names_and_paths_is_printed_literally(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "dir[/x]" / "[bold]")
    _set_attrs(path, name_or_path=np.bytes_(b"[/x]evil[bold]model[/bold] :smile:"))
    _set_attrs(_run_file(path), call=np.bytes_(b"[/]"))
    out = cli_ok("info", path)
    assert "[/x]evil[bold]model[/bold] :smile:" in out and "dir[/x]" in out and "[/]" in out
    cli_error(r"dir\[/x\]", "plot", path, "--run", "7", "--out", tmp_path / "x.png")


def test_dollar_signs_in_file_names_plot(pristine, tmp_path):
    path = _copy(pristine, tmp_path, name=r"cap$\frac$.h5")
    out = tmp_path / "fig.png"
    for kind in ("heatmap", "curves", "exits"):
        cli_ok("plot", path, "--kind", kind, "--run", "1", "--out", out)
        assert out.stat().st_size > 0
        out.unlink()


def test_escape_sequences_from_files_never_reach_the_terminal(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    clipboard = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\u009b31m".encode()
    _set_attrs(path, name_or_path=np.bytes_(clipboard), model_class=np.bytes_(b"\x1b[31mRed"))
    _set_attrs(_run_file(path), call=np.bytes_(b"\x1b[5m"))
    code, out, err = _child("cli", "info", path)
    assert code == 0 and "\x1b" not in out + err and "\x07" not in out + err and "\u009b" not in out + err
    assert r"\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b31m" in out, out
    line = cli_error("no such file", "info", tmp_path / "gone\x1b[2J.h5")
    assert "\x1b" not in line and r"\x1b[2J" in line
    # invisible format characters: a right-to-left override reorders the rest of the line, U+2028/9 break it
    _set_attrs(path, model_class=np.bytes_("\u202eRTL\u2066x\u2028y\u2029\u200b".encode()))
    code, out, err = _child("cli", "info", path)
    assert code == 0 and not any(c in out + err for c in "\u202e\u2066\u2028\u2029\u200b"), out + err
    assert r"\u202eRTL\u2066x\u2028y\u2029\u200b" in out, out


def test_deleted_run_files_and_folders_are_named(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "one")
    _run_file(path, 1).unlink()
    api_error(path, r"run file\(s\) 1 that the index links are missing.*restore")
    cli_error(r"run file\(s\) 1 .*missing", "info", path)
    cli_error(r"run file\(s\) 1 .*missing", "plot", path, "--out", tmp_path / "x.png")
    with loopscope.open(path, missing="skip") as capture:
        assert [r.index for r in capture.runs] == [0] and capture.missing_runs == [1]
        with loopscope.open(pristine) as original:
            np.testing.assert_array_equal(capture.runs[0].states(), original.run(0).states())
    output = cli_ok("info", path, "--missing", "skip")
    assert "damaged" not in output and "1 run(s) the index links are missing, skipped: 1" in output

    folder = _copy(pristine, tmp_path / "folder")
    shutil.rmtree(str(folder) + ".runs")
    api_error(folder, r"run folder .*\.runs is missing")
    cli_error(r"run folder .* is missing", "info", folder)
    with loopscope.open(folder, missing="skip") as capture:
        assert capture.runs == [] and capture.missing_runs == [0, 1]
    assert "2 run(s) the index links are missing, skipped: 0, 1" in cli_ok("info", folder, "--missing", "skip")


def test_stray_run_file_names_are_ignored(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "stray")
    shutil.copyfile(_run_file(path, 1), Path(str(path) + ".runs") / "0000000.h5")
    with loopscope.open(path) as capture, loopscope.open(pristine) as original:
        assert [r.index for r in capture.runs] == [0, 1]
        np.testing.assert_array_equal(capture.run(0).states(), original.run(0).states())
    assert "ignored in the run folder (not run files): 0000000.h5" in cli_ok("info", path)
    _run_file(path, 0).unlink()  # the stray must not stand in for run 0
    api_error(path, r"run file\(s\) 0 that the index links are missing")
    cli_error(r"run file\(s\) 0 ", "plot", path, "--out", tmp_path / "x.png")


def test_run_files_of_another_capture_are_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "ours")
    other = _copy(pristine, tmp_path / "theirs")
    for capture, cid in ((path, "a" * 32), (other, "b" * 32)):
        _set_attrs(capture, capture_id=np.bytes_(cid.encode()))
        for n in (0, 1):
            _set_attrs(_run_file(capture, n), capture_id=np.bytes_(cid.encode()), run_number=n)
    shutil.copyfile(_run_file(other, 1), _run_file(path, 1))
    api_error(path, "000001.h5 belongs to another capture")
    cli_error("belongs to another capture", "plot", path, "--run", "1", "--out", tmp_path / "x.png")
    with loopscope.open(path) as capture:  # run 0 is intact
        assert capture.run(0).states().shape[0] == capture.run(0).num_tokens
    swapped = _copy(other, tmp_path / "swapped")  # same capture, numbers swapped by renaming
    os.replace(_run_file(swapped, 0), tmp_path / "tmp.h5")
    os.replace(_run_file(swapped, 1), _run_file(swapped, 0))
    os.replace(tmp_path / "tmp.h5", _run_file(swapped, 1))
    cli_error("000000.h5 belongs to another capture", "plot", swapped, "--run", "0", "--out", tmp_path / "x.png")
    with pytest.raises(LoopscopeError, match="belongs to another capture"):
        with loopscope.open(swapped) as capture:
            capture.run(1).states()


def test_a_merged_capture_has_an_id_and_its_swapped_run_files_are_refused(pristine, tmp_path):
    """A merged capture's index and run files carry an id of their own (they carried none, so run files swapped or
    copied in went unnoticed); a run file whose number is not its name's is refused where there are no ids too."""
    merged = tmp_path / "m.h5"
    merge(merged, [_copy(pristine, tmp_path / "src")])
    with h5py.File(merged, "r") as index, h5py.File(_run_file(merged, 1), "r") as run:
        ours = index.attrs["capture_id"]
        assert ours and run.attrs["capture_id"] == ours and run.attrs["run_number"] == 1
    for capture in (merged, _copy(pristine, tmp_path / "no_ids")):
        if capture != merged:  # a capture written before ids existed, or whose ids were lost
            for path in (capture, _run_file(capture, 0), _run_file(capture, 1)):
                with h5py.File(path, "a") as f:
                    del f.attrs["capture_id"]
        os.replace(_run_file(capture, 0), tmp_path / "tmp.h5")
        os.replace(_run_file(capture, 1), _run_file(capture, 0))
        os.replace(tmp_path / "tmp.h5", _run_file(capture, 1))
        with pytest.raises(LoopscopeError, match=r"000000\.h5 .*run 1.*not run 0"):
            with loopscope.open(capture) as opened:
                opened.run(0).states()
        assert any(f.run == 0 for f in verify_capture(str(capture)).damaged)


def test_merge_refuses_special_and_crafted_sources(pristine, tmp_path):
    os.mkfifo(tmp_path / "fifo.h5")
    cli_error("fifo.h5 is not a regular file", "merge", tmp_path / "m.h5", tmp_path / "fifo.h5")
    path = _copy(pristine, tmp_path / "src")
    with h5py.File(_run_file(path), "a") as f:
        f["elsewhere"] = h5py.ExternalLink(str(tmp_path / "fifo.h5"), "/")
    cli_error("elsewhere is a link", "merge", tmp_path / "m2.h5", path)
    with h5py.File(_run_file(path), "a") as f:
        del f["elsewhere"]
        f.create_dataset("extra", shape=(2**40,), maxshape=(None,), dtype=np.float64, chunks=(2**16,))
    cli_error("extra declares", "merge", tmp_path / "m3.h5", path)
    assert not (tmp_path / "m3.h5").exists()
