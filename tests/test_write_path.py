"""The writer's state write path: whole chunks assembled from the pieces that arrive, and optional compression.

Writer-level tests drive ``CaptureWriter`` with the messages the hooks send, in the shapes real captures produce
(prefill in step groups, decode one token at a time, prefills split into token blocks, forwards with different
step counts, several runs per batch), and compare every stored value with what was sent -- NaN where nothing was.
Capture-level tests check the same end to end on the reference model.
"""

from __future__ import annotations

import os
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import loopscope
from loopscope.errors import CaptureFileError, LoopscopeError
from loopscope.storage import compression, index, run_files, schema
from loopscope.storage.write import preallocate, staging
from loopscope.storage.write import writer as w
from loopscope.storage.write.buffers import HostBufferPool

PLUGIN_FILTERS = ("lz4", "zstd", "blosc-lz4", "bitshuffle-lz4")


class Driver:
    """Sends writer messages for one batch of runs and keeps the array each run should end up holding."""

    def __init__(self, path, batch=1, hidden=16, dtype=torch.float32, budget=8 << 20, chunks=None, **writer_options):
        index.create_index(str(path), header={"loops": ["core"]}, readout=None)
        self.pool = HostBufferPool(budget)
        self.writer = w.CaptureWriter(run_files.RunFiles(str(path)), self.pool, **writer_options)
        self.path, self.batch, self.hidden, self.dtype, self.chunks = path, batch, hidden, dtype, chunks
        self.run_ids = list(range(batch))
        self.expected = [np.full((0, 0, hidden), np.nan, dtype=np.float32) for _ in range(batch)]
        self.offset = 0
        self.generator = torch.Generator().manual_seed(0)
        self.writer.put(w.OpenRuns(self.run_ids, [{"call": "generate", "loops": ["core"]}] * batch))

    def forward(
        self, tokens: int, steps: int, group: int | None = None, split: int | None = None, planes: int | None = None
    ) -> None:
        """One forward: ``steps`` stored steps of ``tokens`` tokens, sent ``group`` steps per message (all tokens),
        or, with ``split``, one step per message in blocks of ``split`` tokens (a prefill larger than a slab), or,
        with ``planes``, as the capture stages them: slabs of ``planes`` planes of the chunk depth each."""
        ids = np.arange(self.offset, self.offset + tokens, dtype=np.int64)[None].repeat(self.batch, 0)
        self.writer.put(w.Tokens(self.run_ids, self.offset, ids, np.ones_like(ids, dtype=np.int8), ids, 0))
        states = torch.randn(self.batch, tokens, steps, self.hidden, generator=self.generator).to(self.dtype)
        for b in range(self.batch):
            self._expect(b, states[b].float().numpy())
        if split:
            for k in range(steps):
                for t0 in range(0, tokens, split):
                    piece = states[:, t0 : t0 + split, k : k + 1].unsqueeze(0).clone()
                    self._send(self.offset + t0, k, piece, 1)
        elif planes:
            depth = self.chunks[1]
            for k0 in range(0, steps, planes * depth):
                k1 = min(k0 + planes * depth, steps)
                slab = torch.zeros(self.batch, planes * depth, tokens, self.hidden, dtype=self.dtype)
                slab[:, : k1 - k0] = states[:, :, k0:k1].transpose(1, 2)
                slab = slab.reshape(self.batch, planes, depth, tokens, self.hidden).permute(1, 0, 3, 2, 4).contiguous()
                self._send(self.offset, k0, slab, k1 - k0, base=k0, last=k1 == steps)
        else:
            group = group or steps
            for k0 in range(0, steps, group):
                k1 = min(k0 + group, steps)
                slab = torch.zeros(1, self.batch, tokens, group, self.hidden, dtype=self.dtype)
                slab[0, :, :, : k1 - k0] = states[:, :, k0:k1]
                self._send(self.offset, k0, slab, k1 - k0)
        self.writer.put(w.Steps(self.run_ids, "core", self.offset, tokens, steps - 1))
        self.offset += tokens

    def _send(self, offset, step, slab: torch.Tensor, steps: int, base: int | None = None, last=False) -> None:
        self.writer.put(
            w.State(
                self.run_ids,
                "core",
                offset,
                step,
                slab,
                steps,
                self._logical(),
                base=base,
                chunks=self.chunks,
                last=last,
            )
        )

    def close(self, complete: bool = True) -> None:
        self.writer.put(w.CloseRuns(self.run_ids, complete=complete))
        self.writer.close()
        self.writer.raise_if_failed()

    def check(self) -> None:
        with loopscope.open(self.path) as capture:
            assert len(capture.runs) == self.batch
            for run, expected in zip(capture.runs, self.expected):
                np.testing.assert_array_equal(run.states(), expected)

    def _expect(self, b: int, states: np.ndarray) -> None:
        old = self.expected[b]
        tokens, steps = states.shape[:2]
        grown = np.full((self.offset + tokens, max(old.shape[1], steps), self.hidden), np.nan, dtype=np.float32)
        grown[: old.shape[0], : old.shape[1]] = old
        grown[self.offset :, :steps] = states
        self.expected[b] = grown

    def _logical(self) -> str:
        return str(self.dtype).replace("torch.", "")


def _stored_chunks(path) -> tuple:
    with loopscope.open(path) as capture:
        return capture.runs[0].dataset().chunks


def test_the_writer_reports_its_threads_cpu_time_when_it_ends(tmp_path):
    """What benchmarks price the writer with: CPU seconds of its own thread (not the process's), set at its end."""
    d = Driver(tmp_path / "c.h5", hidden=256)
    assert d.writer.cpu_seconds == 0.0
    d.forward(tokens=64, steps=8)
    d.close()
    d.check()
    assert 0.0 < d.writer.cpu_seconds < time.process_time()


@pytest.mark.parametrize("chunks", [None, (3, 2), (5, 4), (4, 3)])
def test_prefill_in_step_groups_then_decode(tmp_path, chunks):
    """A prefill sent 3 steps at a time (chunk depths 2 and 4 cut across the groups; depth 3 matches them, so
    whole chunks are written straight from the slab), then decoding."""
    d = Driver(tmp_path / "c.h5", chunks=chunks)
    d.forward(tokens=11, steps=9, group=3)
    for _ in range(13):
        d.forward(tokens=1, steps=9)
    d.close()
    d.check()
    if chunks:
        assert _stored_chunks(d.path)[:2] == chunks


@pytest.mark.parametrize("chunks", [(4, 3), (3, 2), (5, 4)])
def test_prefill_in_chunk_planes_then_decode(tmp_path, chunks):
    """Slabs laid out in chunk planes, as the hooks send them: 11 tokens x 9 steps, two planes per slab."""
    d = Driver(tmp_path / "c.h5", chunks=chunks)
    d.forward(tokens=11, steps=9, planes=2)
    for _ in range(6):
        d.forward(tokens=1, steps=9, planes=3)
    d.close()
    d.check()


def test_a_forwards_last_plane_is_padded_and_later_deeper_forwards_read_nan_there(tmp_path):
    """8 steps in planes of 3: the last plane's empty row is filled with NaN so its chunks are written whole; when
    later tokens run 11 steps, the first tokens read NaN past their own 8."""
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=8, steps=8, planes=2)
    d.forward(tokens=4, steps=11, planes=2)
    for steps in (5, 11, 2):
        d.forward(tokens=1, steps=steps, planes=4)
    d.close()
    d.check()


def test_a_slab_starting_inside_a_plane(tmp_path):
    """A loop whose first recorded step is not on a chunk boundary (no s0): rows before it stay NaN."""
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    ids = np.arange(6, dtype=np.int64)[None]
    d.writer.put(w.Tokens(d.run_ids, 0, ids, np.ones_like(ids, dtype=np.int8), ids, 0))
    slab = torch.randn(2, 1, 6, 3, 16, generator=d.generator)  # planes of steps 0-2 and 3-5; steps 1-4 recorded
    d._send(0, 1, slab.clone(), 4, base=0)
    d.writer.put(w.Steps(d.run_ids, "core", 0, 6, 4))
    expected = np.full((6, 5, 16), np.nan, dtype=np.float32)
    expected[:, 1:3] = slab[0, 0, :, 1:].numpy()
    expected[:, 3:5] = slab[1, 0, :, :2].numpy()
    d.expected[0] = expected
    d.close()
    d.check()


def test_forwards_with_different_step_counts_leave_nan(tmp_path):
    """Tokens that ran fewer steps than the run's deepest forward read NaN there (fill), never stale data."""
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=6, steps=4)
    d.forward(tokens=3, steps=8)
    for steps in (2, 8, 5, 1, 7):
        d.forward(tokens=1, steps=steps)
    d.close()
    d.check()
    with loopscope.open(d.path) as capture:
        assert np.isnan(capture.runs[0].states(token=0 + 0, step=6)).all()


def test_split_prefill_one_step_per_message(tmp_path):
    d = Driver(tmp_path / "c.h5", chunks=(4, 4))
    d.forward(tokens=21, steps=6, split=5)
    d.forward(tokens=1, steps=6)
    d.close()
    d.check()


@pytest.mark.parametrize("layout", [dict(group=2), dict(planes=2)])
def test_several_runs_in_a_batch(tmp_path, layout):
    d = Driver(tmp_path / "c.h5", batch=3, chunks=(4, 2))
    d.forward(tokens=8, steps=5, **layout)
    for _ in range(6):
        d.forward(tokens=1, steps=5, **layout)
    d.close()
    d.check()


@pytest.mark.parametrize("budget", [1, 20_000])
def test_budget_used_up_falls_back_to_partial_writes(tmp_path, budget):
    """With no room to assemble chunks, rows go through HDF5's partial writes; values stay exact and the staged
    bytes never pass the budget."""
    d = Driver(tmp_path / "c.h5", batch=2, budget=budget, chunks=(4, 3))
    d.forward(tokens=9, steps=7, group=2)
    for _ in range(9):
        d.forward(tokens=1, steps=7)
    d.close()
    d.check()
    assert d.writer.staging.peak <= d.writer.staging.limit


def test_rows_arriving_after_their_tokens_were_finished_are_not_lost(tmp_path):
    """The hooks send a forward's states before its step counts; should a state come later anyway, it is added to
    the chunk already written instead of replacing it."""
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=8, steps=4)
    late = torch.randn(1, 1, 8, 1, 16, generator=d.generator)
    d._send(0, 4, late.clone(), 1)
    grown = np.full((8, 5, 16), np.nan, dtype=np.float32)
    grown[:, :4] = d.expected[0]
    grown[:, 4] = late[0, 0, :, 0].numpy()
    d.expected[0] = grown
    d.close()
    d.check()


def test_bfloat16_bits_survive_staging(tmp_path):
    d = Driver(tmp_path / "c.h5", dtype=torch.bfloat16, chunks=(4, 3))
    d.forward(tokens=5, steps=4, group=3)
    for _ in range(6):
        d.forward(tokens=1, steps=4)
    d.close()
    d.check()  # bf16 -> float32 is exact, so equality means the bits were kept
    with loopscope.open(d.path) as capture:
        ds = capture.runs[0].dataset()
        assert ds.dtype == np.uint16 and capture.runs[0].logical_dtype() == "bfloat16"
        assert ds.fillvalue == schema.BF16_NAN_BITS


def test_each_chunk_is_written_once_without_a_chunk_cache(tmp_path, monkeypatch):
    stored, caches = [], []
    original = staging.ChunkStager._store

    def spy(self, key, data):
        stored.append(key)
        caches.append(self.ds.id.get_access_plist().get_chunk_cache()[1])
        original(self, key, data)

    monkeypatch.setattr(staging.ChunkStager, "_store", spy)
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=8, steps=6, group=4)  # step groups 0-3, 4-5 cut the chunk of steps 3-5
    for _ in range(9):
        d.forward(tokens=1, steps=6)
    d.close()
    d.check()
    # 17 tokens x 6 steps in (4, 3) chunks: 5 token blocks x 2 step blocks, each chunk written exactly once
    assert sorted(stored) == [(t, k) for t in range(5) for k in range(2)]
    assert set(caches) == {0}
    with h5py.File(run_files.RunFiles(str(d.path)).final_path(0), "r") as f:
        assert f["loops/core/states"].id.get_num_chunks() == 10


def test_chunk_depth_divides_the_step_count_when_known():
    assert schema.state_chunks(1024, 4, steps=33)[1] == 11
    assert schema.state_chunks(1024, 4, steps=9)[1] == 9
    tokens, depth, hidden = schema.state_chunks(1024, 4)
    assert tokens * depth * hidden * 4 <= schema.TARGET_CHUNK_BYTES and hidden == 1024
    assert schema.state_chunks(64, 4, steps=5, tokens=3)[0] == schema.MIN_CHUNK_TOKENS
    assert schema.state_chunks(64, 4, steps=5, tokens=3, more_tokens=False)[0] == 3  # a forward run: no empty rows
    # a forward run's token blocks divide its tokens where a size near the limit does (512 under 36: 32, not 35 with
    # a last block of 22 that must be assembled), else they are the fewest equal blocks (37 under 36: 19 + 18)
    assert schema.state_chunks(1024, 4, steps=33, tokens=512, more_tokens=False, max_depth=8)[:2] == (32, 7)
    assert schema.state_chunks(1024, 4, steps=33, tokens=37, more_tokens=False, max_depth=8)[0] == 19
    assert schema.state_chunks(1024, 4, steps=33, tokens=509, more_tokens=False, max_depth=8)[0] == 34


def test_unfinished_run_is_not_completed(tmp_path):
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=5, steps=4)
    d.close(complete=False)
    with loopscope.open(d.path) as capture:
        assert capture.runs == [] and len(capture.incomplete_runs) == 1


# ---- end to end on the reference model --------------------------------------------------------------------------


def _expected_generate(recorder, steps):
    forwards = len(recorder.states) // steps
    rows = [
        torch.stack([recorder.s0[f * steps]] + recorder.states[f * steps : (f + 1) * steps], dim=2)[0]
        for f in range(forwards)
    ]
    return torch.cat(rows, dim=0).numpy()


@pytest.mark.parametrize("codec", [None, "gzip", *PLUGIN_FILTERS])
def test_capture_round_trip_exact_with_each_filter(reference_model, prompt_ids, reference_recorder, tmp_path, codec):
    pytest.importorskip("hdf5plugin") if compression.needs_plugin(codec) else None
    recorder = reference_recorder(reference_model)
    path = tmp_path / "c.h5"
    with loopscope.attach(reference_model, path, compression=codec):
        torch.manual_seed(0)
        reference_model.generate(prompt_ids, num_steps=5, max_new_tokens=12, do_sample=False)
    recorder.remove()
    with loopscope.open(path) as capture:
        run = capture.runs[0]
        np.testing.assert_array_equal(run.states(), _expected_generate(recorder, 5))
        stored = run.dataset().attrs.get("compression")
        assert (schema.as_text(stored) if stored is not None else None) == codec
        assert capture.meta["options_json"]["compression"] == codec


@pytest.mark.parametrize("steps", [8, 7])
def test_prefill_chunks_are_written_straight_from_the_hooks_slabs(
    reference_model, reference_recorder, tmp_path, monkeypatch, steps
):
    """No copy between hook and file on the CPU path: every whole chunk of a prefill is written from the host slab
    the hook copied the states into (with 7 steps, the last plane's empty row is padded), and values are exact."""
    slabs, from_slab = [], []
    acquire, store = HostBufferPool.acquire, staging.ChunkStager._store

    def spy_acquire(self, shape, dtype, pinned=False):
        slabs.append(acquire(self, shape, dtype, pinned))
        return slabs[-1]

    def spy_store(self, key, data):
        from_slab.append(any(np.shares_memory(data, slab.numpy()) for slab in slabs))
        store(self, key, data)

    monkeypatch.setattr(HostBufferPool, "acquire", spy_acquire)
    monkeypatch.setattr(staging.ChunkStager, "_store", spy_store)
    recorder = reference_recorder(reference_model)
    ids = torch.arange(8).unsqueeze(0)
    with loopscope.attach(reference_model, tmp_path / "c.h5", chunks=(4, 3)):
        with torch.no_grad():
            reference_model(ids, num_steps=steps)
    recorder.remove()
    assert from_slab == [True] * 6  # 8 tokens x 8 or 9 states in (4, 3) chunks: 2 x 3 chunks, each written once
    with loopscope.open(tmp_path / "c.h5") as capture:
        np.testing.assert_array_equal(capture.runs[0].states(), _expected_generate(recorder, steps))


def test_chunk_depth_follows_the_steps_of_the_previous_forward(reference_model, tmp_path):
    """The first run cannot know its step count and uses the default depth; the next ones get a depth that
    divides their 9 states, so no chunk is left part empty."""
    ids = torch.arange(16).unsqueeze(0)
    with loopscope.attach(reference_model, tmp_path / "c.h5"):
        with torch.no_grad():
            reference_model(ids, num_steps=8)
            reference_model(ids, num_steps=8)
    with loopscope.open(tmp_path / "c.h5") as capture:
        first, second = (run.dataset().chunks[1] for run in capture.runs)
    assert first == schema.DEFAULT_CHUNK_STEPS and 9 % second == 0


def test_run_files_keep_no_reserved_space_past_their_end(reference_model, prompt_ids, tmp_path):
    """Disk blocks are reserved ahead of the chunk writes; what was not used is given back when the run closes."""
    path = tmp_path / "c.h5"
    with loopscope.attach(reference_model, path):
        torch.manual_seed(0)
        reference_model.generate(prompt_ids, num_steps=6, max_new_tokens=4, do_sample=False)
    (run_file,) = (tmp_path / "c.h5.runs").glob("*.h5")
    stat = os.stat(run_file)
    assert stat.st_blocks * 512 < stat.st_size + (64 << 10)


@pytest.mark.skipif(preallocate._fallocate is None, reason="fallocate is Linux only")
def test_reserve_ahead_then_release(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"x" * 5000)
    reserve = preallocate.Reserve(str(target))
    reserve.ahead(1 << 20)
    grown = os.stat(target)
    reserve.release()
    after = os.stat(target)
    assert grown.st_size == after.st_size == 5000 and target.read_bytes() == b"x" * 5000
    assert grown.st_blocks * 512 >= preallocate.MIN_RESERVE > after.st_blocks * 512


def test_capture_interrupted_by_an_exception_keeps_completed_runs(reference_model, prompt_ids, tmp_path):
    path = tmp_path / "c.h5"
    calls = []

    def fail_on_fourth_decode(module, args, output):
        calls.append(1)
        if len(calls) == 4 * 3 + 3:  # prefill (3 steps) + 3 decode forwards: inside the 4th forward's loop
            raise RuntimeError("boom")

    with loopscope.attach(reference_model, path, chunks=(4, 2)):
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=6)
            handle = reference_model.transformer.core_block[-1].register_forward_hook(fail_on_fourth_decode)
            with pytest.raises(RuntimeError, match="boom"), pytest.warns(RuntimeWarning, match="closed the capture"):
                reference_model.generate(prompt_ids, num_steps=3, max_new_tokens=10, do_sample=False)
            handle.remove()
    with loopscope.open(path) as capture:
        (run,) = capture.runs
        assert run.states().shape == (prompt_ids.shape[1], 7, reference_model.config.n_embd)
        assert not np.isnan(run.states()).any()
        assert len(capture.incomplete_runs) == 1


def test_unknown_filter_is_a_one_line_error(reference_model, tmp_path):
    with pytest.raises(LoopscopeError, match="compression='snappy' is not one of") as info:
        loopscope.attach(reference_model, tmp_path / "c.h5", compression="snappy")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "c.h5").exists()


def test_missing_hdf5plugin_is_a_one_line_error_naming_the_extra(reference_model, prompt_ids, tmp_path, monkeypatch):
    pytest.importorskip("hdf5plugin")
    path = tmp_path / "c.h5"
    with loopscope.attach(reference_model, path, compression="lz4"):
        with torch.no_grad():
            reference_model(prompt_ids, num_steps=2)
    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # makes `import hdf5plugin` raise ImportError
    with pytest.raises(LoopscopeError, match=r"pip install 'loopscope\[compress\]'") as info:
        loopscope.attach(reference_model, tmp_path / "d.h5", compression="zstd")
    assert "\n" not in str(info.value) and not (tmp_path / "d.h5").exists()
    with loopscope.open(path) as capture:
        with pytest.raises(CaptureFileError, match=r"'lz4'.*pip install 'loopscope\[compress\]'") as info:
            capture.runs[0].states()
    assert "\n" not in str(info.value)


def test_close_reports_the_memory_used_within_the_budget(reference_model, prompt_ids, tmp_path):
    """Decoding stages partial chunks in the writer; the peaks of both host buffers are in the file, within
    ``buffer_mb`` (slabs) and its staging share (chunks)."""
    budget = 2 << 20
    with loopscope.attach(reference_model, tmp_path / "m.h5", buffer_mb=budget / (1 << 20)):
        torch.manual_seed(0)
        reference_model.generate(prompt_ids, num_steps=6, max_new_tokens=12, do_sample=False)
    with loopscope.open(tmp_path / "m.h5") as capture:
        meta = capture.meta
        assert 0 < meta["buffer_peak_bytes"] <= budget
        assert 0 < meta["staging_peak_bytes"] <= budget * w.STAGING_SHARE
        assert meta["backpressure_waits"] >= 0 and meta["orphan_loop_calls"] == 0


def test_per_token_data_written_in_several_blocks_equals_one_block(
    reference_model, tokenizer, prompt_ids, tmp_path, monkeypatch
):
    """Per-token datasets are created by their first block of metadata and extended by later ones: with blocks of 4
    tokens (a generate() longer than TOKEN_CHUNK) every per-token array, the token text and the states equal those
    of the same generate() written in one block at close."""

    def capture(path):
        with loopscope.attach(reference_model, path, tokenizer=tokenizer):
            torch.manual_seed(0)
            reference_model.generate(prompt_ids, num_steps=3, max_new_tokens=11, do_sample=False)

    capture(tmp_path / "one.h5")
    monkeypatch.setattr(w, "TOKEN_CHUNK", 4)
    capture(tmp_path / "blocks.h5")
    with loopscope.open(tmp_path / "one.h5") as one, loopscope.open(tmp_path / "blocks.h5") as blocks:
        a, b = one.runs[0], blocks.runs[0]
        assert a.num_tokens == b.num_tokens == prompt_ids.shape[1] + 10
        for name in ("token_ids", "attention_mask", "positions", "forward_index", "num_steps"):
            np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
        assert b.tokens == a.tokens and all(b.tokens)
        np.testing.assert_array_equal(b.states(), a.states())
    with h5py.File(tmp_path / "blocks.h5.runs" / "000000.h5") as f:
        assert f["token_ids"].chunks == (4,) and f["loops/core/num_steps"].chunks == (4,)


def test_decoded_tokens_fill_their_blocks_chunks_in_one_buffer(tmp_path, monkeypatch):
    """Tokens decoded one per forward, in slabs of the chunk depth, go into one buffer per block of tokens
    (``staging._TokenRow``) and each block's chunks are written once, whole. Every value lands where it should,
    NaN elsewhere: tokens of different depths (a deeper one widens the buffer), a token spread over two slabs, one
    whose slab starts inside a plane, and a block that a three-token forward joins (it switches to pieces)."""
    rows, stores = [], []
    flush_row, store = staging.ChunkStager._flush_row, staging.ChunkStager._store

    def spy_flush_row(self, ti, early=False):
        rows.append((ti, early, self.rows[ti].data.shape[0]))
        flush_row(self, ti, early)

    def spy_store(self, key, data):
        stores.append(key)
        store(self, key, data)

    monkeypatch.setattr(staging.ChunkStager, "_flush_row", spy_flush_row)
    monkeypatch.setattr(staging.ChunkStager, "_store", spy_store)
    d = Driver(tmp_path / "c.h5", chunks=(4, 3))
    d.forward(tokens=4, steps=6, planes=2)  # block 0: the prefill, whole chunks from its slab
    for steps in (5, 9, 2, 12):  # block 1 token by token; the 12-step token needs a fourth column
        d.forward(tokens=1, steps=steps, planes=4)
    d.forward(tokens=1, steps=10, planes=2)  # block 2: steps 0-5 in one slab, 6-9 in the next
    ids = np.array([[9]])
    d.writer.put(w.Tokens(d.run_ids, d.offset, ids, np.ones_like(ids, dtype=np.int8), ids, 0))
    slab = torch.randn(2, 1, 1, 3, 16, generator=d.generator)  # steps 1-4 of planes 0-2 and 3-5 (no s0)
    d._send(d.offset, 1, slab.clone(), 4, base=0)
    d.writer.put(w.Steps(d.run_ids, "core", d.offset, 1, 4))
    grown = np.full((d.offset + 1, d.expected[0].shape[1], 16), np.nan, dtype=np.float32)
    grown[: d.offset] = d.expected[0]
    grown[d.offset, 1:3], grown[d.offset, 3:5] = slab[0, 0, 0, 1:].numpy(), slab[1, 0, 0, :2].numpy()
    d.expected[0], d.offset = grown, d.offset + 1
    d.forward(tokens=3, steps=4, planes=2)  # three tokens at once into block 2 (tokens 10-12) and block 3
    for steps in (3, 8):
        d.forward(tokens=1, steps=steps, planes=3)
    d.close()
    d.check()
    assert (1, False, 4) in rows  # block 1 went through one buffer, widened to 4 columns, written when finished
    assert (2, True, 4) in rows  # block 2's buffer was written early when the three-token forward joined it
    assert stores.count((1, 0)) == 1 and stores.count((1, 3)) == 1  # block 1's chunks: each written once
