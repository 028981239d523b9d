"""The convergence measures and trajectory PCA as Dask computations, for captures one process cannot get through.

A study of thousands of prompts fills terabytes; the streamed analysis (``metrics.py``) reads it on one core.
Here every run's states dataset becomes a ``dask.array`` whose blocks are whole HDF5 chunks of tokens, the
measures are one ``blockwise`` call per run (the same arithmetic, :func:`measures.block_measures`), and one
``compute`` runs every block of every run and file in parallel: on local threads by default, or on a
``dask.distributed`` cluster given its address (``scheduler="tcp://host:port"``).

h5py handles cannot be pickled, so tasks never carry one: a :class:`StatesSource` names a dataset by file path and
opens it inside the task that reads it, which is what lets workers on other machines (sharing the file system) read.
Dask is an optional dependency (``pip install 'loopscope[scale]'``), imported only when this analysis runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CaptureFileError, LoopscopeError, first_line
from ..storage import compression, safety, schema
from ..storage.reader import CaptureFile, ReadoutNorm, Run
from . import pca as _pca
from .metrics import BLOCK_BYTES, METRICS, TokenMetrics, _token_block, stored_block_measures
from .pca import TrajectoryPCA
from .reference import check_reference, open_reference_run, reference_states, resolve_space, space_fn, stored_values

LOCAL_SCHEDULERS = ("threads", "processes", "sync")
CONNECT_TIMEOUT = "10s"  # how long to wait for a cluster's scheduler before saying it is unreachable


def require_dask():
    """``(dask, dask.array)``, or a one-line error saying how to install them."""
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise LoopscopeError("the Dask analysis needs dask: pip install 'loopscope[scale]'") from None
    return dask, da


@dataclass(frozen=True)
class StatesSource:
    """One states dataset, addressed by path: picklable, and opened inside the task that reads it.

    ``dask.array.from_array`` reads through ``__getitem__``, once per block, so each task opens the file, reads
    its block of whole chunks and closes it; opening costs well under a millisecond against a block of megabytes.
    """

    path: str
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    locking: bool | str | None = None
    codec: str | None = None  # the states' compression filter, when it needs hdf5plugin loaded where the task runs

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, selection) -> np.ndarray:
        kwargs = {} if self.locking is None else {"locking": self.locking}
        if compression.needs_plugin(self.codec):  # importing hdf5plugin registers the filter in this process
            compression.plugin(f"{self.path} is compressed with {self.codec!r}, which", CaptureFileError)
        try:
            with safety.open_regular(self.path, **kwargs) as file:  # swapped for a FIFO since planning: no hang
                return file[self.name][selection]
        except (OSError, KeyError, ValueError) as exc:
            raise CaptureFileError(f"{self.path} is damaged or unreadable ({first_line(exc)})") from None


@dataclass
class _RunPlan:
    """What the driver reads up front for one run (small per-token data), and the graph's inputs."""

    capture: str
    number: int
    run: Any  # the Run while planning, then its per-token data (_TokenData) once the file is closed
    loop: str
    space: str
    source: StatesSource
    block: int  # tokens per Dask block, a multiple of the HDF5 chunk's tokens
    bf16: bool
    readout: ReadoutNorm | None
    steps: np.ndarray
    dtype: np.dtype  # of the states in the analysis space: float32 (state space) or float64 (readout, float64 runs)


def token_metrics(
    captures: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    runs: Sequence[int] | None = None,
    reference: Any = "final",
    space: str = "auto",
    loop: str | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    block_bytes: int = BLOCK_BYTES,
    locking: bool | str | None = None,
    missing: str = "error",
) -> list[TokenMetrics]:
    """Every measure of every selected run of every capture, computed by Dask; one :class:`TokenMetrics` per run,
    in the order (capture, run), equal to :func:`loopscope.analysis.token_metrics` on the same run with its default
    ``measures`` (all of them).

    ``runs``: run indices (as ``CaptureFile.run``) taken from each capture; None for all. ``reference``: ``"final"``,
    a run index of the same capture, or ``"other.h5[:N]"``; the reference states are read by the workers too.
    ``scheduler``: None or ``"threads"`` (local threads, ``workers`` of them), ``"processes"``, ``"sync"``, a
    ``dask.distributed`` address such as ``"tcp://10.0.0.5:8786"``, or a ``distributed.Client``. ``missing``: as
    :class:`CaptureFile`'s (``"skip"``: the runs whose files are there), for every file a task opens.
    """
    dask, da = require_dask()
    opening = {"locking": locking, "missing": missing}
    if isinstance(reference, Run):
        raise LoopscopeError("the Dask analysis takes reference='final', a run index or 'file.h5[:N]', not a Run")
    plans = _plan_runs(_as_paths(captures), runs, space, loop, block_bytes, opening)
    reference = _absolute_reference(reference)  # read by the workers, which may run in another directory
    graphs = []
    for p in plans:
        states = da.from_array(p.source, chunks=(p.block, -1, -1), asarray=True, lock=False, name=False)
        steps = da.from_array(p.steps, chunks=(p.block,))
        args: list = [states, "tkh", steps, "t"]
        if not _is_final(reference):
            ref = dask.delayed(_reference_rows, pure=True)(p.capture, p.number, reference, p.space, p.loop, opening)
            star = da.from_delayed(ref, shape=(len(p.steps), p.source.shape[2]), dtype=p.dtype)
            args += [star.rechunk((p.block, -1)), "th"]
        else:
            args += [None, None]
        graphs.append(
            da.blockwise(
                _measure_block,
                "tmk",
                *args,
                new_axes={"m": len(METRICS)},
                dtype=np.float64,
                concatenate=True,
                bf16=p.bf16,
                readout=p.readout,
            )
        )
    labels = _reference_labels(plans, reference, opening)  # also checks each reference before any task runs
    results = compute(*graphs, scheduler=scheduler, workers=workers)
    out = []
    for p, values, label in zip(plans, results, labels):
        run = p.run
        out.append(
            TokenMetrics(
                run=run.index,
                loop=p.loop,
                space=p.space,
                reference=label,
                num_steps=p.steps,
                token_ids=run.token_ids,
                positions=run.positions,
                tokens=run.tokens,
                **{name: values[:, i, :] for i, name in enumerate(METRICS)},
                iterations=run.iterations,
                step_stride=run.step_stride,
            )
        )
    return out


def trajectory_pca(
    selection: Iterable[tuple[str | os.PathLike, int, Sequence[int]]],
    *,
    n_components: int = 6,
    space: str = "auto",
    loop: str | None = None,
    basis: str = "token",
    scheduler: Any = None,
    workers: int | None = None,
    locking: bool | str | None = None,
    missing: str = "error",
) -> list[TrajectoryPCA]:
    """Principal components of the trajectories of ``(capture, run, tokens)`` selections, possibly from many files.

    ``basis="token"``: each token's own components (one SVD per token, in parallel). ``basis="shared"``: one set of
    components over every selected trajectory of every file, individually centred (a tall-skinny SVD,
    ``dask.array.linalg.svd``). For one run this equals :func:`loopscope.analysis.trajectory_pca`.
    """
    dask, da = require_dask()
    if basis not in _pca.BASES:
        raise LoopscopeError(f"basis={basis!r} is not one of {', '.join(_pca.BASES)}")
    selection = [(os.fspath(c), int(r), list(t)) for c, r, t in selection]
    if not any(tokens for _, _, tokens in selection):
        raise LoopscopeError("select at least one token for the PCA")
    trajectories, labels, tokens_out, held = [], [], [], []
    for capture_path, number, tokens in selection:
        with CaptureFile(capture_path, locking=locking, missing=missing) as capture:
            run = capture.run(number)
            plan = _plan_run(capture_path, run.index, run, space, loop, BLOCK_BYTES, locking)
            n, iterations = run.num_tokens, run.step_iterations(loop)
            one_token = da.from_array(plan.source, chunks=(1, -1, -1), asarray=True, lock=False, name=False)
            for t in tokens:
                if not -n <= t < n:
                    raise LoopscopeError(f"token {t} is out of range: run {run.index} has {n} tokens (use 0..{n - 1})")
                rows = one_token[t % n, : int(plan.steps[t]) + 1]
                x = rows.map_blocks(_to_space, bf16=plan.bf16, readout=plan.readout, dtype=plan.dtype)
                x = x.astype(np.float64)  # as the streamed PCA
                trajectories.append(x)
                labels.append(_pca._label(run, t))
                tokens_out.append(t % n)
                held.append(iterations[t % n, : int(plan.steps[t]) + 1])
    centres = [x.mean(axis=0) for x in trajectories]
    centred = [x - c for x, c in zip(trajectories, centres)]
    if basis == "shared":
        _, singular, vt = da.linalg.svd(da.concatenate(centred, axis=0))
        total = sum((c * c).sum() for c in centred)
        parts = compute(vt, singular, total, centres, centred, scheduler=scheduler, workers=workers)
        vt, singular, total, centres, centred = parts
        axes, variance = _pca._oriented_axes(vt, singular, n_components)
        pieces = [(axes, variance, total)] * len(centred)
    else:
        tasks = [dask.delayed(_token_axes, pure=True)(c, n_components) for c in centred]  # one numpy SVD each
        pieces, centres, centred = compute(tasks, centres, centred, scheduler=scheduler, workers=workers)
    results = []
    for t, label, x, centre, (axes, variance, total), its in zip(tokens_out, labels, centred, centres, pieces, held):
        explained = variance / total if total > 0 else np.zeros_like(variance)
        results.append(TrajectoryPCA(t, label, x @ axes.T, explained, centre, its))
    return results


def compute(*collections, scheduler: Any = None, workers: int | None = None):
    """``dask.compute`` on the chosen scheduler (see :func:`token_metrics`), with one-line errors."""
    dask, _ = require_dask()
    if workers is not None and workers < 1:
        raise LoopscopeError(f"workers={workers} must be at least 1")
    if scheduler is None or scheduler in LOCAL_SCHEDULERS:
        kwargs = {"num_workers": workers} if workers and scheduler != "sync" else {}
        return dask.compute(*collections, scheduler=scheduler or "threads", **kwargs)
    if workers is not None:
        raise LoopscopeError("workers= sets local threads; a cluster has the workers it was started with")
    with _client(scheduler) as client:
        return dask.compute(*collections, scheduler=client)


@contextlib.contextmanager
def _client(scheduler):
    """A ``distributed.Client`` for an address (closed afterwards), or the Client given."""
    try:
        from distributed import Client
    except ImportError:
        raise LoopscopeError("a Dask cluster needs distributed: pip install 'loopscope[scale]'") from None
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if not isinstance(scheduler, str) or "://" not in scheduler:
        raise LoopscopeError(
            f"scheduler={scheduler!r}: use {', '.join(LOCAL_SCHEDULERS)} or a Dask scheduler address such as "
            "tcp://host:8786"
        )
    try:
        client = Client(scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise LoopscopeError(
            f"cannot reach the Dask scheduler at {scheduler} ({first_line(exc)}); start one with `dask scheduler` "
            "or check the address"
        ) from None
    with client:
        yield client


# ---- planning (driver side, small reads only) -----------------------------------------------------------------------
def _as_paths(captures) -> list[str]:
    if isinstance(captures, (str, os.PathLike)):
        return [os.fspath(captures)]
    paths = [os.fspath(c) for c in captures]
    if not paths:
        raise LoopscopeError("give at least one capture file to analyse")
    return paths


def _plan_runs(paths, runs, space, loop, block_bytes, opening: dict) -> list[_RunPlan]:
    plans = []
    for path in paths:
        with CaptureFile(path, **opening) as capture:
            numbers = list(runs) if runs else [run.index for run in capture.runs]
            if not numbers:
                raise LoopscopeError(f"{path} has no complete runs")
            for number in numbers:
                run = capture.run(number)  # -1 and the like resolved once: every task reads this very run
                plans.append(_plan_run(path, run.index, run, space, loop, block_bytes, opening["locking"]))
                plans[-1].run = _TokenData(plans[-1].run, plans[-1].loop)
    return plans


def _plan_run(path, number, run: Run, space, loop, block_bytes, locking) -> _RunPlan:
    space = resolve_space(run, space)
    steps = run.steps_of(loop).astype(np.int64)  # a clear error first if the run has no such loop
    ds = run.dataset(loop)  # for a merged run, also checks that every source is there (else HDF5 reads NaN)
    name = loop if loop is not None else run.loops[0]
    chunks = schema.dataset_chunks(ds)
    space_fn(run, space)  # one-line error when space="readout" but the file stores no readout norm
    bf16 = run.logical_dtype(loop) == "bfloat16"
    readout = run.capture.readout if space == "readout" else None
    return _RunPlan(
        capture=os.path.abspath(path),  # the workers open the files: a cluster's run in their own directories
        number=number,
        run=run,
        loop=name,
        space=space,
        source=StatesSource(
            os.path.abspath(run.path),
            ds.name,
            tuple(ds.shape),
            ds.dtype,
            locking,
            schema.as_text(ds.attrs.get("compression")),
        ),
        block=_token_block(ds.shape[1], ds.shape[2], block_bytes, chunks),
        bf16=bf16,
        readout=readout,
        steps=steps,
        dtype=_to_space(np.empty((0, ds.shape[2]), ds.dtype), bf16=bf16, readout=readout).dtype,
    )


class _TokenData:
    """The per-token data of a run, read once, so results can be labelled after the capture file is closed."""

    def __init__(self, run: Run, loop: str):
        self.index = run.index
        self.token_ids = run.token_ids
        self.positions = run.positions
        self.tokens = run.tokens
        self.iterations = run.iterations_of(loop)
        self.step_stride = run.step_stride


def _absolute_reference(reference):
    """``"other.h5[:N]"`` with an absolute path, as the workers must find it; other references as they are."""
    if not isinstance(reference, (str, os.PathLike)) or os.fspath(reference) == "final":
        return reference
    text = os.fspath(reference)
    head, sep, tail = text.rpartition(":")
    if sep and tail.isdigit() and not os.path.exists(text):
        return f"{os.path.abspath(head)}:{tail}"
    return os.path.abspath(text)  # "other.h5:-1" too: its ":-1" kept


def _is_final(reference) -> bool:
    return isinstance(reference, str) and reference == "final"


def _reference_labels(plans, reference, opening: dict) -> list[str]:
    if _is_final(reference):
        return ["final"] * len(plans)
    labels = []
    for p in plans:  # the label needs only the reference run's step counts: a small read
        with CaptureFile(p.capture, **opening) as capture, contextlib.ExitStack() as stack:
            run = capture.run(p.number)
            ref_run = open_reference_run(run, reference, stack)
            assert ref_run is not None  # "final" returned above
            check_reference(run, ref_run, p.loop)  # on the driver: a clear error before any task runs
            steps = ref_run.steps_of(p.loop)[: run.num_tokens]
            same = os.path.abspath(ref_run.capture.path) == os.path.abspath(run.capture.path)
            where = f"run {ref_run.index}" if same else f"{os.path.basename(ref_run.capture.path)}:{ref_run.index}"
            labels.append(f"{where} ({int(steps.max()) if steps.size else 0} steps)")
    return labels


# ---- tasks (run on workers; arguments are plain data) ---------------------------------------------------------------
def _measure_block(raw: np.ndarray, last: np.ndarray, star: np.ndarray | None, *, bf16: bool, readout) -> np.ndarray:
    """[b, M, K]: every measure of a block of tokens, from its stored states."""
    space = readout if readout is not None else stored_values
    values = stored_block_measures(_decode(raw, bf16=bf16), last, star, space)
    return np.stack([values[name] for name in METRICS], axis=1)


def _to_space(raw: np.ndarray, *, bf16: bool, readout: ReadoutNorm | None) -> np.ndarray:
    """Stored states -> the analysis space, as ``space_fn``."""
    data = _decode(raw, bf16=bf16)
    return readout(data) if readout is not None else stored_values(data)


def _decode(raw: np.ndarray, *, bf16: bool) -> np.ndarray:
    """Stored states -> floats, as ``Run.decode`` (bf16 bit patterns widen exactly)."""
    return np.left_shift(raw, 16, dtype=np.uint32).view(np.float32) if bf16 else raw


def _reference_rows(capture_path, number, reference, space, loop, opening: dict) -> np.ndarray | None:
    """s* of every token of one run, [T, H] in the analysis space, read where the task runs."""
    with CaptureFile(capture_path, **opening) as capture, contextlib.ExitStack() as stack:
        run = capture.run(number)
        return reference_states(run, open_reference_run(run, reference, stack), space, loop).states


def _token_axes(centred: np.ndarray, n_components: int):
    axes, variance = _pca._principal_axes(centred, n_components)
    return axes, variance, float(np.sum(centred * centred))
