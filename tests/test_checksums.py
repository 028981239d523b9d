"""Fletcher-32 on every chunk: written by the capture (direct chunk writes included), checked on every read, and
walked whole by ``loopscope verify``. Real captures of the reference model, real files, bits flipped on disk."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loopscope
from loopscope.cli.app import app
from loopscope.errors import CaptureFileError
from loopscope.storage import checksum, index, merge, run_files
from loopscope.storage.verify import verify_capture
from loopscope.storage.write import writer as w


def _datasets(path) -> dict[str, h5py.Dataset]:
    """Every dataset of one HDF5 file by name (the file stays open while the caller looks; closed by gc)."""
    f = h5py.File(path, "r")
    found = {}
    f.visititems(lambda name, obj: found.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _all_files(path) -> list[str]:
    return [str(path)] + [p for p, _ in run_files.list_run_files(str(path)).values()]


def _flip(path: str, dataset: str, chunk: int = 0, at: int = 17) -> tuple[int, ...]:
    """Flip one bit of byte ``at`` of a stored chunk, as a bad disk sector would; returns the chunk's offset."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + at)
        byte = fh.read(1)[0]
        fh.seek(info.byte_offset + at)
        fh.write(bytes([byte ^ 0x10]))
    return tuple(info.chunk_offset)


def _capture(model, tokenizer, path, new_tokens=20, **options):
    """Run 0: a greedy generate() (two blocks of tokens); run 1: a forward over the prompt."""
    ids = tokenizer("Looped models think by iterating over their latent state.", return_tensors="pt").input_ids
    with loopscope.attach(model, path, tokenizer=tokenizer, **options):
        torch.manual_seed(0)
        model.generate(ids, num_steps=6, max_new_tokens=new_tokens, do_sample=False)
        with torch.no_grad():
            model(ids, num_steps=5)
    return path


# ---- the checksum itself --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).standard_normal((16, 16, 64)).astype(np.float32),
        np.random.default_rng(1).standard_normal((3, 5)),  # float64, 120 bytes: a partial 4096-word row
        np.random.default_rng(2).integers(0, 1 << 16, (300, 70), dtype=np.uint16),
        np.random.default_rng(3).integers(0, 256, 1001, dtype=np.uint8),  # odd byte count
        np.full(2 * 4096 * 2 + 1, 0xFF, dtype=np.uint8),  # odd, all ones: sums that reduce to 0xFFFF
        np.full(5000, 0xFF, dtype=np.uint8),
        np.zeros(7, dtype=np.uint8),  # all zero: the one case that checks to 0
        np.arange(3 * 4096 * 2, dtype=np.int64),  # whole rows only
    ],
    ids=["f32", "f64-partial-row", "u16", "u8-odd", "ff-odd", "ff", "zeros-odd", "i64-whole-rows"],
)
def test_fletcher32_equals_hdf5s_own_filter(tmp_path, data):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        ds = f.create_dataset("x", data=data, chunks=data.shape, fletcher32=True)
        _mask, raw = ds.id.read_direct_chunk((0,) * data.ndim)
    assert len(raw) == data.nbytes + 4
    assert checksum.fletcher32(memoryview(raw)[:-4]) == checksum.stored_value(raw)
    assert checksum.fletcher32(data) == checksum.stored_value(raw)


def _hdf5_checksum(tmp_path, data: np.ndarray) -> int:
    """The Fletcher-32 HDF5's own filter stores for ``data`` as one chunk."""
    with h5py.File(tmp_path / "ref.h5", "w") as f:
        ds = f.create_dataset("x", data=data, chunks=data.shape, fletcher32=True)
        _mask, raw = ds.id.read_direct_chunk((0,) * data.ndim)
    return checksum.stored_value(raw)


# Sizes around the sum's own blocks: a row is 2048 16-bit words (4 KiB), a block 64 rows (256 KiB).
_ROW_BYTES = 2 * 2048


@pytest.mark.parametrize(
    "nbytes",
    [
        1,
        2,
        3,
        5,
        8,
        9,
        15,
        17,
        _ROW_BYTES - 1,
        _ROW_BYTES,
        _ROW_BYTES + 2,
        64 * _ROW_BYTES,
        64 * _ROW_BYTES + 9,
        129 * _ROW_BYTES + 8 * 37 + 5,
        (1 << 20) + 4,
    ],
)
def test_fletcher32_at_every_block_boundary_equals_hdf5s(tmp_path, nbytes):
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    assert checksum.fletcher32(data) == _hdf5_checksum(tmp_path, data)
    ones = np.full(nbytes, 0xFF, dtype=np.uint8)  # every word 0xFFFF: the sums' largest values
    assert checksum.fletcher32(ones) == _hdf5_checksum(tmp_path, ones)


def test_fletcher32_summed_in_small_blocks_equals_hdf5s(tmp_path, monkeypatch):
    """Blocks of 2 rows: many blocks, and a last one cut short by the buffer's end."""
    monkeypatch.setattr(checksum, "_BLOCK_ROWS", 2)
    for nbytes in (17 * _ROW_BYTES + 3, 10 * _ROW_BYTES, 5 * _ROW_BYTES + 8):
        data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        assert checksum.fletcher32(data) == _hdf5_checksum(tmp_path, data)


@pytest.mark.parametrize("rows", [1, 65535, 65536, 200_003])
def test_row_sums_stay_exact_past_65535_rows(rows):
    """Past 65535 rows (256 MiB) the row numbers and sums wrap around mod 65535. Every row the same (a broadcast
    view, no memory), so the exact sums have a closed form: total = rows * sum(y), and sum(i * v) over words
    i = r * COLS + c is COLS * sum(y) * rows * (rows - 1) / 2 + rows * sum(c * y_c)."""
    y = np.random.default_rng(rows).integers(0, 1 << 16, checksum._COLS, dtype=np.uint16)
    y[:7] = 0xFFFF  # the largest words
    x = np.broadcast_to(y, (rows, checksum._COLS))
    total, weighted = checksum._whole_rows(x)
    sum_y = int(y.astype(np.int64).sum())
    exact = checksum._COLS * sum_y * rows * (rows - 1) // 2 + rows * int((np.arange(y.size) * y.astype(np.int64)).sum())
    assert total == rows * sum_y
    assert weighted == exact % 65535


def test_fletcher32_in_several_threads_at_once_equals_one_at_a_time():
    """Each thread sums in scratch blocks of its own (the writer checksums while the analysis reads and checks)."""
    rng = np.random.default_rng(11)
    buffers = [rng.integers(0, 256, (k + 1) * 64 * _ROW_BYTES + 7 * k, dtype=np.uint8) for k in range(4)]
    expected = [checksum.fletcher32(b) for b in buffers]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            assert list(pool.map(checksum.fletcher32, buffers)) == expected


def test_fletcher32_changes_with_any_one_flipped_bit():
    """Every 16-bit lane of the 64-bit words, the rows' ends, the tail past the last row and an odd last byte."""
    data = np.random.default_rng(7).integers(0, 256, 3 * _ROW_BYTES + 8 * 5 + 3, dtype=np.uint8)
    clean = checksum.fletcher32(data)
    for at in [
        0,
        1,
        2,
        3,
        4,
        5,
        6,
        7,
        _ROW_BYTES - 1,
        _ROW_BYTES,
        2 * _ROW_BYTES + 13,
        3 * _ROW_BYTES + 9,
        data.size - 1,
    ]:
        for bit in (0, 7):
            flipped = data.copy()
            flipped[at] ^= 1 << bit
            assert checksum.fletcher32(flipped) != clean, (at, bit)


def test_a_direct_chunk_write_without_spare_bytes_behind_it_is_checksummed_too(tmp_path):
    """Chunks written straight from a slab take the 4 bytes behind them in place; the last one has none."""
    from loopscope.storage.write.staging import ChunkBudget, ChunkStager

    slab = np.random.default_rng(0).standard_normal((2, 4, 3, 8)).astype(np.float32)  # two whole chunks
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("s", shape=(8, 3, 8), dtype=np.float32, chunks=(4, 3, 8), fletcher32=True, rdcc_nbytes=0)
        stager = ChunkStager(ds, np.nan, ChunkBudget(1 << 20), checksum=True)
        before = slab.copy()
        stager.write(0, 0, slab.reshape(8, 3, 8))
        stager.flush_all()
        assert stager.chunks_written == 2
        np.testing.assert_array_equal(slab, before)  # the borrowed bytes were put back
        np.testing.assert_array_equal(ds[()], before.reshape(8, 3, 8))  # HDF5 checked both checksums
        assert not list(checksum.damaged_chunks(ds))


# ---- what a capture writes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options",
    [{}, {"dtype": "bfloat16"}, {"step_stride": 2}, {"compression": "lz4"}, {"compression": "gzip"}],
    ids=["float32", "bfloat16", "step-stride", "lz4", "gzip"],
)
def test_every_dataset_of_a_capture_is_checksummed(reference_model, tokenizer, reference_recorder, tmp_path, options):
    if options.get("compression") == "lz4":
        pytest.importorskip("hdf5plugin")
    recorder = reference_recorder(reference_model)
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", **options)
    recorder.remove()
    names = set()
    for file in _all_files(path):
        for name, ds in _datasets(file).items():
            names.add(name.split("/")[-1])
            assert checksum.has_fletcher32(ds), (file, name)
            if options.get("compression"):
                plist = ds.id.get_create_plist()
                filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
                assert filters[-1] == checksum.FLETCHER32  # after the compression, as HDF5 must apply it
    assert {
        "states",
        "num_steps",
        "token_ids",
        "token_bytes",
        "token_ends",
        "attention_mask",
        "positions",
        "forward_index",
        "weight",
    } <= names
    result = verify_capture(path)
    assert result.ok and not result.unchecked and result.chunks >= result.datasets
    # the forward (run 1, prefill path) reads back exactly as the hand-written hooks saw it
    steps = 5
    s0, later = recorder.s0[-steps], recorder.states[-steps:]  # the adapter runs once per iteration
    expected = torch.stack([s0] + later, dim=2)[0]
    if options.get("dtype") == "bfloat16":
        expected = expected.to(torch.bfloat16).float()
    with loopscope.open(path) as capture:
        run = capture.runs[1]
        stored = run.states()
        if options.get("step_stride"):
            kept = run.step_iterations()[0]
            expected = expected[:, kept]
        np.testing.assert_array_equal(stored, expected.numpy())
        assert run.states(token=-1).shape[0] == run.num_steps[-1] + 1  # the decode path reads through checksums


def test_signals_and_step_labels_are_checksummed(tmp_path):
    """Datasets the reference model never makes: a signal (Ouro's exit gate) and nested-loop labels."""
    from loopscope.storage.write.buffers import HostBufferPool

    index.create_index(str(tmp_path / "c.h5"), header={"loops": ["core"]}, readout=None)
    writer = w.CaptureWriter(
        run_files.RunFiles(str(tmp_path / "c.h5")), HostBufferPool(1 << 20), inner_steps={"core": 2}
    )
    ids = np.arange(5, dtype=np.int64)[None]
    writer.put(w.OpenRuns([0], [{"call": "forward"}]))
    writer.put(w.Tokens([0], 0, ids, np.ones_like(ids, dtype=np.int8), ids, 0))
    writer.put(w.State([0], "core", 0, 0, torch.ones(1, 1, 5, 4, 8), 4, "float32"))
    writer.put(w.Signal([0], "core", "gate", 0, 0, np.ones((1, 5, 4), dtype=np.float32)))
    writer.put(w.Steps([0], "core", 0, 5, 3))
    writer.put(w.CloseRuns([0]))
    writer.close()
    writer.raise_if_failed()
    found = _datasets(run_files.list_run_files(str(tmp_path / "c.h5"))[0][0])
    assert {"loops/core/signals/gate", "loops/core/step_labels", "loops/core/states"} <= set(found)
    assert all(checksum.has_fletcher32(ds) for ds in found.values())


# ---- damage on disk --------------------------------------------------------------------------------------------------
def test_a_flipped_bit_in_states_is_a_one_line_error_naming_run_loop_and_tokens(reference_model, tokenizer, tmp_path):
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5")
    run_file = run_files.list_run_files(str(path))[0][0]
    with loopscope.open(path) as capture:
        clean = capture.runs[0].states()
        ct, ck, _ = capture.runs[0].dataset().chunks
        n_tokens = capture.runs[0].num_tokens
    assert n_tokens > ct  # at least two blocks of tokens: one damaged, one not
    offset = _flip(run_file, "loops/core/states", chunk=0, at=1000)
    assert offset[:2] == (0, 0)
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        with pytest.raises(CaptureFileError) as info:
            run.states(token=3)
        message = str(info.value)
        assert "\n" not in message
        assert f"run 0, loop core, tokens 0-{ct - 1}, steps 0-{ck - 1}: chunk checksum mismatch" in message
        assert "loopscope verify" in message
        with pytest.raises(CaptureFileError, match="run 0, loop core, tokens 0-"):
            run.states(step=0)
        np.testing.assert_array_equal(run.states(token=ct + 1), clean[ct + 1, : run.num_steps[ct + 1] + 1])
        np.testing.assert_array_equal(capture.runs[1].states(), capture.runs[1].states())  # other runs: fine

    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1, result.output
    assert "loops/core/states" in result.output and f"tokens 0-{ct - 1}, steps 0-{ck - 1}" in result.output
    assert "checksum mismatch" in result.output and "Traceback" not in result.output
    assert [(f.run, f.dataset, f.where) for f in verify_capture(path).damaged] == [
        (0, "loops/core/states", f"tokens 0-{ct - 1}, steps 0-{ck - 1}")
    ]


def test_a_clean_capture_verifies(reference_model, tokenizer, tmp_path):
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", new_tokens=3)
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok: every checksummed chunk" in result.output and "not checksummed" not in result.output


def test_incomplete_run_files_are_a_warning_not_damage(reference_model, tokenizer, tmp_path):
    """A run cut short (a killed writer's truncated file, an empty one) or still being written is skipped by every
    reader, so verify names it without failing the capture (was: exit 1 for good after any crash); damage in a
    complete run still fails it."""
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", new_tokens=3)
    folder = run_files.runs_dir(str(path))
    complete = run_files.list_run_files(str(path))[0][0]
    data = open(complete, "rb").read()
    open(os.path.join(folder, "000007.partial.h5"), "wb").write(data[: len(data) // 2])  # killed mid-write
    open(os.path.join(folder, "000008.partial.h5"), "wb").close()  # killed right after reserving its number
    result = verify_capture(path)
    assert result.ok and not result.damaged and len(result.incomplete) == 2
    assert len(result.incomplete_problems) == 2 and {f.run for f in result.incomplete_problems} == {7, 8}
    cli = CliRunner().invoke(app, ["verify", str(path)])
    assert cli.exit_code == 0, cli.output
    assert "2 incomplete run file(s)" in cli.output and "ok: every checksummed chunk" in cli.output
    _flip(complete, "token_ids", at=2)
    assert CliRunner().invoke(app, ["verify", str(path)]).exit_code == 1


@pytest.mark.parametrize("stand_in", ["empty HDF5 file", "the index", "no token_ids"])
def test_a_file_that_is_no_run_under_a_run_files_name_fails_verify(reference_model, tokenizer, tmp_path, stand_in):
    """Its chunks are sound, so verify once said ok while every reader refused the run ("not a loopscope run
    file"): verify now applies the reader's layout check to each run file."""
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", new_tokens=3)
    run_file = run_files.list_run_files(str(path))[0][0]
    if stand_in == "empty HDF5 file":
        os.remove(run_file)
        h5py.File(run_file, "w").close()
    elif stand_in == "the index":
        os.replace(run_file, run_file + ".bak")
        with open(path, "rb") as src, open(run_file, "wb") as dst:
            dst.write(src.read())
    else:
        with h5py.File(run_file, "r+") as f:
            del f["token_ids"]
    result = verify_capture(path)
    assert [(f.run, f.dataset) for f in result.damaged] == [(0, "")]
    assert ("no 'token_ids'" if stand_in == "no token_ids" else "not a loopscope run file") in result.damaged[0].problem
    cli = CliRunner().invoke(app, ["verify", str(path)])
    assert cli.exit_code == 1 and "Traceback" not in cli.output


def test_a_flipped_bit_in_token_ids_is_detected(reference_model, tokenizer, tmp_path):
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", new_tokens=3)
    run_file = run_files.list_run_files(str(path))[1][0]
    _flip(run_file, "token_ids", at=2)
    with loopscope.open(path) as capture:
        with pytest.raises(CaptureFileError, match="chunk failed its checksum") as info:
            capture.runs[1].token_ids
        assert "\n" not in str(info.value)
        capture.runs[0].token_ids  # the other run is intact
    result = CliRunner().invoke(app, ["verify", str(path)])
    assert result.exit_code == 1
    assert "token_ids" in result.output and "tokens 0-" in result.output


def test_verify_errors_are_one_line(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    for target in (tmp_path / "missing.h5", tmp_path / "x.h5"):
        result = CliRunner().invoke(app, ["verify", str(target)])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_files_written_without_checksums_are_a_warning_not_a_failure(reference_model, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(w, "CaptureWriter", functools.partial(w.CaptureWriter, checksums=False))
    path = _capture(reference_model, tokenizer, tmp_path / "c.h5", new_tokens=3)
    result = verify_capture(path)
    assert result.ok and result.unchecked and all(f.run is not None for f in result.unchecked)
    cli = CliRunner().invoke(app, ["verify", str(path)])
    assert cli.exit_code == 0 and "not checksummed" in cli.output


def test_a_merged_capture_is_verified_through_its_sources(reference_model, tokenizer, tmp_path):
    a = _capture(reference_model, tokenizer, tmp_path / "a.h5", new_tokens=3)
    out = tmp_path / "all.h5"
    merge.merge(out, [a])
    for file in _all_files(out):
        for name, ds in _datasets(file).items():
            assert ds.is_virtual or checksum.has_fletcher32(ds), (file, name)
    clean = verify_capture(out)
    assert clean.ok and clean.virtual and not clean.unchecked
    _flip(run_files.list_run_files(str(a))[1][0], "loops/core/states", at=64)
    damaged = verify_capture(out)
    assert [f.run for f in damaged.damaged] == [1] and "source" in damaged.damaged[0].dataset
    with loopscope.open(out) as capture:
        with pytest.raises(CaptureFileError, match="run 1, loop core, tokens") as info:
            capture.runs[1].states()
        assert "\n" not in str(info.value)


def test_streamed_block_reads_check_each_chunk_themselves(reference_model, tokenizer, tmp_path, monkeypatch):
    """Analysis reads blocks of tokens into a reused buffer: those chunks are read raw and checked in numpy."""
    from loopscope.analysis import metrics

    path = _capture(reference_model, tokenizer, tmp_path / "c.h5")
    checked = []
    original = checksum.read_token_block
    monkeypatch.setattr(checksum, "read_token_block", lambda *a: checked.append(original(*a)) or checked[-1])
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        ds = run.dataset()
        ct = ds.chunks[0]
        out = np.empty((ds.shape[0],) + ds.shape[1:], ds.dtype)
        np.testing.assert_array_equal(run.read(np.s_[0 : ds.shape[0]], out=out), ds[()])
        assert checked == [True]
        np.testing.assert_array_equal(run.read(np.s_[ct:], out=out[ct:]), ds[ct:])
        assert checked[-1] is True
    _flip(run_files.list_run_files(str(path))[0][0], "loops/core/states", chunk=1, at=8)
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        with pytest.raises(CaptureFileError, match=r"run 0, loop core, tokens \d+-\d+, steps \d+-\d+: chunk checksum"):
            run.read(np.s_[0 : run.num_tokens], out=np.empty_like(out))
        with pytest.raises(CaptureFileError, match="chunk checksum mismatch"):
            metrics.token_metrics(run)
