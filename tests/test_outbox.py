"""Decoded tokens' messages go to the writer several forwards at a time (``storage/write/outbox.py``): in the order
they were put, at once when anything else is put, and never in a way that makes the hook wait on itself."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch

import loopscope
from loopscope.storage.write.messages import Batch, CloseRuns, State
from loopscope.storage.write.outbox import Outbox


def _queued(q: queue.Queue) -> list:
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    return items


def test_deferred_batches_keep_the_order_the_messages_were_put_in():
    q: queue.Queue = queue.Queue()
    box = Outbox(q, defer_batches=3, defer_bytes=1 << 20)
    m = [CloseRuns([i]) for i in range(8)]
    with box.together():
        box.put(m[0])
        box.put(m[1])
    with box.together():
        box.put(m[2])
    assert q.empty()  # two forwards' batches wait for a third
    box.put(m[3])  # anything put outside a batch first sends what waits
    assert _queued(q) == [Batch([m[0], m[1], m[2]]), m[3]]
    for i in (4, 5, 6):
        with box.together():
            box.put(m[i])
    assert _queued(q) == [Batch([m[4], m[5], m[6]])]  # the third batch sends them
    with box.together():
        box.put(m[7])
    box.push()  # drain() and close() do this
    box.push()  # nothing left: nothing sent
    assert _queued(q) == [m[7]]


def test_a_forward_whose_slabs_are_large_is_sent_at_once():
    """A prefill's slabs pass the byte limit: its batch is not held back for the next forwards."""
    q: queue.Queue = queue.Queue()
    box = Outbox(q, defer_batches=16, defer_bytes=4096)
    state = State([0], "core", 0, 0, torch.zeros(1, 1, 4, 4, 64), 4, "float32")  # 4 KiB
    with box.together():
        box.put(state)
        box.put(CloseRuns([0]))
    assert _queued(q) == [Batch([state, CloseRuns([0])])]


def test_decoding_wakes_the_writer_once_per_several_tokens(reference_model, prompt_ids, tmp_path, monkeypatch):
    new_tokens = 33
    capture = loopscope.attach(reference_model, tmp_path / "d.h5")
    queued = []
    put = capture.writer._queue.put
    monkeypatch.setattr(capture.writer._queue, "put", lambda item, *a, **k: (queued.append(item), put(item, *a, **k)))
    torch.manual_seed(0)
    reference_model.generate(prompt_ids, num_steps=4, max_new_tokens=new_tokens, do_sample=False)
    capture.close()
    # the runs' opening, 33 forwards (the prompt's and 32 decoded tokens) in batches of 16, the closing, the stop
    assert len(queued) == 1 + 3 + 1 + 1
    with loopscope.open(tmp_path / "d.h5") as f:
        assert f.runs[0].num_tokens == prompt_ids.shape[1] + new_tokens - 1


def test_deferred_slabs_that_fill_the_pool_are_sent_before_the_hook_waits(reference_model, prompt_ids, tmp_path):
    """A budget of four decoded tokens' slabs, where the outbox would hold sixteen: the pool sends what is deferred
    before it waits for a slab (the writer then gives those back), instead of waiting on slabs nobody will free."""

    def generate():
        torch.manual_seed(0)
        reference_model.generate(prompt_ids, num_steps=4, max_new_tokens=24, do_sample=False)

    with loopscope.attach(reference_model, tmp_path / "ample.h5"):
        generate()
    capture = loopscope.attach(reference_model, tmp_path / "small.h5", buffer_mb=(8 << 10) / (1 << 20))
    sent = []
    send = capture.pool.before_wait
    assert send is not None
    capture.pool.before_wait = lambda: (sent.append(1), send())
    failed: list[BaseException] = []
    thread = threading.Thread(target=lambda: _run(generate, failed), daemon=True)
    thread.start()
    thread.join(timeout=120)
    if thread.is_alive():
        capture.pool.close()  # wakes the waiting hook, so that the process can end
        thread.join(timeout=30)
        pytest.fail("the hook waited for slabs that only its own deferred messages held")
    capture.close()
    assert not failed and sent
    with loopscope.open(tmp_path / "ample.h5") as ample, loopscope.open(tmp_path / "small.h5") as small:
        np.testing.assert_array_equal(small.runs[0].states(), ample.runs[0].states())


def _run(function, failed: list) -> None:
    try:
        function()
    except BaseException as exc:  # surfaced by the test, not lost in the thread
        failed.append(exc)
