"""Crafted links between files: virtual datasets that map themselves (HDF5 recurses until the process crashes),
chains of them, FIFOs where ``verify`` or a Dask task opens a run file or a source, unlimited mappings (HDF5 opens
their sources as soon as the shape is asked for), and a ``source_chunks`` hint of zeros that readers divide by.

Whatever could crash or block runs in a child process under a timeout, so the suite itself can neither crash nor
hang: a segfault, a hang or a traceback fails the test.
"""

from __future__ import annotations

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
from loopscope.analysis import token_metrics
from loopscope.storage import schema, virtual
from loopscope.storage.merge import merge
from loopscope.storage.verify import verify_capture

TIMEOUT = 60
CHILD = r"""
import sys
mode, *args = sys.argv[1:]
if mode == "cli":
    from loopscope.cli.app import app
    sys.argv = ["loopscope", *args]
    app()
from loopscope.errors import LoopscopeError
try:
    if mode == "api":
        import loopscope
        from loopscope.analysis import token_metrics
        with loopscope.open(args[0]) as capture:
            for run in capture.runs:
                for loop in run.loops:
                    run.states(loop=loop)
                    token_metrics(run, loop=loop)
    elif mode == "task":  # what a Dask task does with its block
        import numpy
        from loopscope.analysis.distributed import StatesSource
        StatesSource(args[0], "/loops/core/states", (1, 1, 1), numpy.dtype("float32"))[()]
    print("ok")
except LoopscopeError as exc:
    print("error:", exc)
"""


def _child(*args) -> tuple[int, str, str]:
    code, out, err = run_script(CHILD, *args, timeout=TIMEOUT, columns=400)
    assert code >= 0, f"killed by signal {-code}: {out}{err}"  # a segfault
    assert "Traceback" not in out + err, out + err
    return code, out, err


def api_error(path: Path, pattern: str, mode: str = "api") -> None:
    code, out, err = _child(mode, path)
    assert code == 0 and out.startswith("error:") and re.search(pattern, out), out + err


def cli_error(pattern: str, *args) -> None:
    code, out, err = _child("cli", *args)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and re.search(pattern, lines[0]), out + err


def verify_fails(pattern: str, path: Path) -> None:
    """``loopscope verify`` finishes, lists the problem and exits 1."""
    code, out, err = _child("cli", "verify", path)
    assert code == 1 and re.search(pattern, out), out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"error: \d+ damaged chunk\(s\) or file\(s\) in .*cap\.h5", lines[0]), err


def _run_file(path: Path, number: int = 0) -> Path:
    return Path(str(path) + ".runs") / f"{number:06d}.h5"


def _map_states(
    run_file: Path, source: str, name: str | None = None, *, unlimited: bool = False, loop_name: str = "core"
) -> None:
    """Replace the states of ``loop_name`` in ``run_file`` by a virtual dataset of the same shape mapping ``name``
    (by default the same loop's states) in ``source`` (as stored in the file: relative to its folder, or "." for
    the file itself)."""
    name = name or f"/loops/{loop_name}/states"
    with h5py.File(run_file, "a") as f:
        loop = f["loops"][loop_name]
        shape, dtype, attrs = loop["states"].shape, loop["states"].dtype, dict(loop["states"].attrs)
        del loop["states"]
        if unlimited:
            grow = (None, *shape[1:])
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype, maxshape=grow)
            mapped = h5py.VirtualSource(source, name, shape=shape, maxshape=grow)
            layout[: h5py.h5s.UNLIMITED] = mapped[: h5py.h5s.UNLIMITED]
        else:
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            layout[...] = h5py.VirtualSource(source, name, shape=shape)
        ds = loop.create_virtual_dataset("states", layout, fillvalue=np.nan)
        ds.attrs.update(attrs)


def _states(path: Path, run: int = 0) -> np.ndarray:
    with loopscope.open(path) as capture:
        return capture.run(run).states()


# ---- cycles and chains of virtual datasets -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["own name", "dot"])
def test_states_that_map_themselves_are_refused(pristine, tmp_path, name):
    path = _copy(pristine, tmp_path)
    _map_states(_run_file(path), "000000.h5" if name == "own name" else ".")
    cycle = r"000000\.h5: the states of loop 'core' map themselves \(a cycle of virtual datasets\); the file is damaged"
    api_error(path, cycle)
    cli_error(cycle, "plot", path, "--run", "0", "--out", tmp_path / "x.png")
    cli_error(cycle, "export", path, "--format", "npz", "--out", tmp_path / "x.npz")
    cli_error(cycle, "convergence", path, "--run", "0", "--out", tmp_path / "x.csv")
    verify_fails(r"states of loop 'core' map themselves", path)
    np.testing.assert_array_equal(_states(path, 1), _states(pristine, 1))  # the other run reads as before


def test_info_flags_a_run_whose_second_loop_maps_itself(hrm_capture, tmp_path):
    """``info`` read only the first loop's states, so a run whose loop L maps itself was listed as sound while every
    command reading L refused it; now the row is damaged, found from the mappings alone, and so is Jupyter's."""
    path = _copy(hrm_capture, tmp_path)
    _map_states(_run_file(path), ".", loop_name="L")
    cycle = r"000000\.h5: the states of loop 'L' map themselves \(a cycle of virtual datasets\); the file is damaged"
    cli_error(cycle, "plot", path, "--run", "0", "--loop", "L", "--out", tmp_path / "x.png")
    code, out, err = _child("cli", "info", path)
    assert code == 0 and re.search(r"│ 0 +│ damaged ", out) and "1 damaged run file(s)" in out, out + err
    with loopscope.open(path) as capture:
        assert "damaged: 000000.h5: the states of loop &#x27;L&#x27; map themselves" in capture._repr_html_()
        assert "damaged: " in capture.run(0)._repr_html_()


def test_two_run_files_that_map_each_other_are_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _map_states(_run_file(path, 0), "000001.h5")
    _map_states(_run_file(path, 1), "000000.h5")
    api_error(path, r"000000\.h5: the states of loop 'core' map themselves through \S*000001\.h5 \(a cycle of virtual")
    cli_error("a cycle of virtual datasets", "plot", path, "--run", "1", "--out", tmp_path / "x.png")
    verify_fails("a cycle of virtual datasets", path)


def test_a_cycle_below_the_run_is_refused(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    _map_states(_run_file(path, 0), "000001.h5")
    _map_states(_run_file(path, 1), "000001.h5")
    api_error(
        path,
        r"000000\.h5: the states of loop 'core' map \S*000001\.h5, whose states of loop 'core' map themselves "
        r"\(a cycle of virtual datasets\)",
    )


def _chain(pristine: Path, folder: Path, length: int) -> Path:
    """A capture whose run 0 maps a chain of ``length`` copies of its run file, each mapping the next; the last
    holds the states."""
    path = _copy(pristine, folder)
    chain = folder / "chain"
    chain.mkdir()
    for i in range(length):
        shutil.copyfile(_run_file(pristine), chain / f"c{i:03d}.h5")
        if i:
            _map_states(chain / f"c{i - 1:03d}.h5", f"c{i:03d}.h5")
    _map_states(_run_file(path), "../chain/c000.h5")
    return path


def test_a_chain_of_virtual_datasets_is_read_to_a_bounded_depth(pristine, tmp_path):
    short = _chain(pristine, tmp_path / "short", 3)
    np.testing.assert_array_equal(_states(short), _states(pristine))
    long = _chain(pristine, tmp_path / "long", virtual.MAX_DEPTH + 8)
    deep = rf"states of loop 'core' map through a chain of more than {virtual.MAX_DEPTH} files of virtual datasets"
    api_error(long, deep)
    cli_error(deep, "plot", long, "--run", "0", "--out", tmp_path / "x.png")


def test_a_source_dataset_behind_a_link_or_missing_is_refused(pristine, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    linked = _copy(pristine, tmp_path / "linked")
    with h5py.File(_run_file(linked, 1), "a") as f:
        f["elsewhere"] = h5py.ExternalLink(str(fifo), "/loops/core/states")  # HDF5 would follow it into the FIFO
    _map_states(_run_file(linked, 0), "000001.h5", "/elsewhere")
    api_error(linked, r"000001\.h5: /elsewhere is a link; damaged")
    verify_fails(r"/elsewhere is a link", linked)

    lacking = _copy(pristine, tmp_path / "lacking")
    _map_states(_run_file(lacking, 0), "000001.h5", "/nothing")  # HDF5 would read the fill value, NaN
    api_error(lacking, r"/loops/core/states maps /nothing of \S*000001\.h5, which that file lacks; the file is damaged")
    verify_fails(r"which that file lacks", lacking)


def test_a_merge_of_a_merge_is_verified_down_to_the_chunks(pristine, tmp_path):
    path = _copy(pristine, tmp_path / "src")
    inner, outer = tmp_path / "inner.h5", tmp_path / "outer.h5"
    merge(inner, [path])
    merge(outer, [inner])
    np.testing.assert_array_equal(_states(outer), _states(pristine))
    clean = verify_capture(outer)
    assert clean.ok and clean.virtual and not clean.unchecked, clean
    with h5py.File(_run_file(path), "r") as f:
        info = f["loops/core/states"].id.get_chunk_info(0)
    with open(_run_file(path), "r+b") as raw:  # flip a bit in the middle of the first chunk of the states
        raw.seek(info.byte_offset + info.size // 2)
        byte = raw.read(1)[0]
        raw.seek(-1, os.SEEK_CUR)
        raw.write(bytes([byte ^ 0x10]))
    damaged = verify_capture(outer)
    assert [f.run for f in damaged.damaged] == [0] and "source" in damaged.damaged[0].dataset, damaged


# ---- FIFOs and unlimited mappings --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["000002.h5", "000002.partial.h5"])
def test_verify_refuses_a_fifo_named_like_a_run_file(pristine, tmp_path, name):
    path = _copy(pristine, tmp_path)
    os.mkfifo(_run_file(path, 2).with_name(name))
    if name == "000002.h5":
        verify_fails(r"not a regular file \(a FIFO, device or socket\)", path)
        return
    code, out, err = _child("cli", "verify", path)  # an incomplete run, which readers skip: listed, not fatal
    assert code == 0 and re.search(r"incomplete run: not a regular file \(a FIFO, device or socket\)", out), out + err


def test_verify_refuses_a_fifo_source(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    os.mkfifo(tmp_path / "fifo.h5")
    _map_states(_run_file(path), "../fifo.h5")
    verify_fails(r"fifo\.h5, which is not a regular file", path)
    cli_error(r"fifo\.h5, which is not a regular file", "plot", path, "--run", "0", "--out", tmp_path / "x.png")


@pytest.mark.parametrize("source", ["fifo", "run file"])
def test_an_unlimited_mapping_is_refused_before_its_shape_is_read(pristine, tmp_path, source):
    path = _copy(pristine, tmp_path)
    os.mkfifo(tmp_path / "fifo.h5")
    _map_states(_run_file(path), "../fifo.h5" if source == "fifo" else "000001.h5", unlimited=True)
    refused = "/loops/core/states maps an unlimited selection, which loopscope never writes; damaged"
    api_error(path, refused)
    cli_error(refused, "plot", path, "--run", "0", "--out", tmp_path / "x.png")
    code, out, err = _child("cli", "info", path)
    assert code == 0 and "damaged" in out, out + err  # run 1 is still listed
    verify_fails("unlimited selection", path)


def test_virtual_states_that_declare_far_more_than_they_map_are_refused(pristine, tmp_path):
    """A merged run's states declaring a million steps but mapping the source's few: refused in one line by every
    reader (convergence read fill for hours, or died of a MemoryError), and named by info and verify, which called
    the file sound. Checked by info and verify first: a reader without the check would allocate the declared size."""
    merged = tmp_path / "cap.h5"
    merge(merged, [_copy(pristine, tmp_path / "src")])
    with h5py.File(_run_file(merged), "a") as f:
        loop = f["loops"]["core"]
        old = loop["states"]
        shape, dtype, attrs, source = old.shape, old.dtype, dict(old.attrs), old.virtual_sources()[0]
        del loop["states"]
        layout = h5py.VirtualLayout(shape=(shape[0], 1 << 20, shape[2]), dtype=dtype)
        layout[:, : shape[1], :] = h5py.VirtualSource(source.file_name, source.dset_name, shape=shape)
        loop.create_virtual_dataset("states", layout, fillvalue=np.nan).attrs.update(attrs)
    refused = r"/loops/core/states declares \d+ bytes but maps \d+; the file is damaged"
    code, out, err = _child("cli", "info", merged)
    assert code == 0 and "damaged" in out, out + err
    verify_fails(refused, merged)
    api_error(merged, refused)
    cli_error(refused, "convergence", merged, "--run", "0", "--out", tmp_path / "c.csv")


def test_a_dask_task_refuses_a_fifo(tmp_path):
    os.mkfifo(tmp_path / "000000.h5")
    api_error(tmp_path / "000000.h5", r"000000\.h5 is damaged or unreadable \(not a regular file", mode="task")


# ---- source_chunks -----------------------------------------------------------------------------------------------
def _metrics(path: Path) -> list[np.ndarray]:
    with loopscope.open(path) as capture:
        return [token_metrics(run).relative_distance for run in capture.runs]


def test_contiguous_states_with_a_zero_source_chunks_hint_read_as_their_own(pristine, tmp_path):
    path = _copy(pristine, tmp_path)
    with h5py.File(_run_file(path), "a") as f:
        loop = f["loops/core"]
        data, attrs = loop["states"][()], dict(loop["states"].attrs)
        del loop["states"]
        ds = loop.create_dataset("states", data=data)  # contiguous: no chunks of its own
        ds.attrs.update(attrs)
        ds.attrs["source_chunks"] = np.zeros(3, np.int64)
    with loopscope.open(path) as capture:
        assert schema.dataset_chunks(capture.run(0).dataset()) == data.shape
    for got, want in zip(_metrics(path), _metrics(pristine)):
        np.testing.assert_array_equal(got, want)
    for command in (("plot", "--out", tmp_path / "x.png"), ("convergence", "--out", tmp_path / "x.csv")):
        code, out, err = _child("cli", command[0], path, *command[1:])
        assert code == 0, out + err


@pytest.mark.parametrize(
    "hint",
    [
        np.zeros(3, np.int64),
        np.array([-4, 4, 128]),
        np.array([0.5, 4.0, 128.0]),
        np.array([16, 4]),
        np.array([[16, 4, 128]]),
        np.bytes_(b"16,4,128"),
        np.int64(16),
    ],
    ids=["zeros", "negative", "float", "short", "2-d", "text", "scalar"],
)
def test_a_merged_run_with_a_damaged_source_chunks_hint_reads_the_same(pristine, tmp_path, hint):
    merged = tmp_path / "merged.h5"
    merge(merged, [pristine])
    with h5py.File(_run_file(merged), "a") as f:
        f["loops/core/states"].attrs["source_chunks"] = hint
    with loopscope.open(merged) as capture:
        ds = capture.run(0).dataset()
        assert ds.is_virtual and schema.dataset_chunks(ds) == ds.shape
    for got, want in zip(_metrics(merged), _metrics(pristine)):
        np.testing.assert_array_equal(got, want)


def test_a_good_source_chunks_hint_is_kept_within_the_shape(pristine, tmp_path):
    merged = tmp_path / "merged.h5"
    merge(merged, [pristine])
    with loopscope.open(pristine) as original, loopscope.open(merged) as capture:
        for number in (0, 1):
            source, ds = original.run(number).dataset(), capture.run(number).dataset()
            assert ds.is_virtual
            assert schema.dataset_chunks(ds) == tuple(min(c, n) for c, n in zip(source.chunks, source.shape))
