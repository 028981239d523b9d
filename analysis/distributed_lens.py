"""The logit lens as Dask tasks: blocks of tokens of every run of every file, on local threads or a cluster.

Each task opens the capture by path (h5py handles cannot travel), reads its block of states, and reads them out
through the head of a checkpoint directory, read once per worker process (``_worker_readout``): a worker on another
machine needs the directory on a shared file system, as it needs the captures. A loaded model works too, on local
threads (``scheduler=None``, ``"threads"`` or ``"sync"``), where the tasks share it. The arithmetic is the one
:func:`~loopscope.analysis.readout_lens.lens` runs (``lens_measure.py``), so both give the same numbers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ..errors import LoopscopeError
from ..storage.reader import CaptureFile
from . import lens_readout
from . import readout_lens as single
from .distributed import compute, require_dask
from .lens_measure import assemble
from .lens_result import LensResult


def lens(
    captures: str | os.PathLike | list[str | os.PathLike],
    model: nn.Module | str | os.PathLike,
    *,
    runs: list[int] | None = None,
    loop: str | None = None,
    top_k: int = 5,
    tokenizer=None,
    scheduler: Any = None,
    workers: int | None = None,
    block_tokens: int = 256,
    locking: bool | str | None = None,
) -> list[LensResult]:
    """The logit lens of every complete run (or those numbered in ``runs``) of ``captures``, one result per run in
    file order. ``model``: a checkpoint directory (any scheduler) or a loaded model (local threads only); the
    other options as in :func:`loopscope.analysis.lens` and :func:`loopscope.analysis.distributed.token_metrics`."""
    dask, _ = require_dask()
    paths = [os.fspath(captures)] if isinstance(captures, (str, os.PathLike)) else [os.fspath(p) for p in captures]
    loaded = isinstance(model, nn.Module)
    if loaded and scheduler not in (None, "threads", "sync"):  # local threads share the model; processes cannot
        raise LoopscopeError("a loaded model can only be shared by local threads; pass its checkpoint directory")
    plans = []  # (path, run number, loop, token blocks, what the tasks read out with)
    readouts: dict[tuple[str, str], lens_readout.Readout] = {}
    for path in paths:
        with CaptureFile(path, locking=locking) as capture:
            numbers = runs if runs is not None else [run.index for run in capture.runs]
            for number in numbers:
                run = capture.run(number)
                name = single.check_loop(run, loop)
                head = readouts.get((path, name))
                if head is None:  # built once per file and loop on the driver: a bad model fails before any task
                    if not loaded:
                        single.check_directory(Path(model), run)  # type: ignore[arg-type]
                    head = readouts[path, name] = single.readout_for(run, model, name)
                single.check_readout(run, name, head)  # one readout for the file's runs of a loop: each checked
                n_tokens = run.num_tokens
                blocks = [(t, min(t + block_tokens, n_tokens)) for t in range(0, n_tokens, block_tokens)]
                # threads share the driver's readout; a process reads the checkpoint's head once (_worker_readout)
                plans.append((path, number, name, blocks, head if loaded else os.fspath(model)))  # type: ignore[arg-type]
    tasks = [
        [dask.delayed(_block)(path, number, name, source, t0, t1, top_k, locking) for t0, t1 in blocks]
        for path, number, name, blocks, source in plans
    ]
    computed = compute(*tasks, scheduler=scheduler, workers=workers)
    if tokenizer is None and not loaded:
        tokenizer = single.tokenizer_of(Path(model), trust_remote_code=False)  # type: ignore[arg-type]
    results = []
    for (path, number, name, _, _), pieces in zip(plans, computed):
        with CaptureFile(path, locking=locking) as capture:
            run = capture.run(number)
            parts = {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}
            result = assemble(run, name, "logit", parts, run.steps_of(name).astype(np.int64))
            result.tokens, result.positions = run.tokens, run.positions
        if tokenizer is not None:
            result.top1_text = single.top1_texts(result.top1, tokenizer)
        results.append(result)
    return results


@functools.lru_cache(maxsize=8)
def _worker_readout(directory: str, capture_path: str, loop: str, locking) -> lens_readout.Readout:
    """The head of ``directory`` for this capture's loop, read once per worker process."""
    with CaptureFile(capture_path, locking=locking) as capture:
        if not capture.runs:
            raise LoopscopeError(f"{capture_path} has no complete run to read the readout norm of")
        return single.readout_for(capture.runs[0], directory, loop)


def _block(path: str, number: int, loop: str, source, t0: int, t1: int, top_k: int, locking) -> dict[str, np.ndarray]:
    """The lens measures of tokens t0:t1 of one run, read where the task runs. ``source``: the driver's readout
    (threads), or the checkpoint directory to read the head from (any worker)."""
    head = source if isinstance(source, lens_readout.Readout) else _worker_readout(source, path, loop, locking)
    with CaptureFile(path, locking=locking) as capture:
        run = capture.run(number)
        return single.block_measures(run, loop, head, t0, t1, run.steps_of(loop).astype(np.int64)[t0:t1], top_k)
