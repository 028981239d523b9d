"""One run of a capture read back, lazily: asking for one token's trajectory or one iteration touches only the
chunks that hold it. Every read is checked (layout, shapes, chunk checksums), so a damaged file gives a one-line
:class:`CaptureFileError` naming the run, loop, tokens and steps. No torch here.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import TYPE_CHECKING

import h5py
import numpy as np

from ..errors import CaptureFileError
from . import checksum, layout, open_runs, safety, schema
from .damage import chunk_check_failed, damaged_read_message, reading
from .virtual import check_sources

if TYPE_CHECKING:
    from .reader import CaptureFile


class Run:
    """One sequence's capture: its tokens and, for each loop, every iteration's state."""

    def __init__(self, capture: CaptureFile, index: int, path: str):
        self.capture = capture
        self.index = index
        self.name = schema.run_name(index)
        self.path = path
        self._group: h5py.File | None = None
        self._checked: tuple[int, ...] | None = None  # the run file's signature when it was last checked
        self._sources_checked = False  # a merged run's states live in other files (virtual datasets)
        self._datasets: dict[str | None, h5py.Dataset] = {}  # checked states datasets, while the file is open
        self._pins = 0  # uses of the open file under way (open_runs.py, under its lock): it is not closed meanwhile

    @contextmanager
    def use(self) -> Iterator[h5py.File]:
        """The run's HDF5 group (the root of its run file), opened on use and held open until the block ends. Only
        so many run files stay open at once (``open_runs.py``): one closed to make room for another's opens again
        here, but never one in use, so threads may share runs."""
        group = open_runs.pin(self)
        try:
            yield group
        finally:
            open_runs.unpin(self)

    @property
    def group(self) -> h5py.File:
        """The run's open file, not held open: where another thread may read other runs, use ``with run.use()``."""
        with self.use() as group:
            return group

    def _open(self) -> h5py.File:
        """Open the run file (``open_runs.pin``, under its lock); checked (layout, that it is this run) unless it is
        the very file checked before. A merged run's sources are checked again on their next use: they may have been
        replaced while the file was closed, though the run file was not."""
        self._sources_checked = False
        open_runs.opening(self)
        try:
            try:
                group = safety.open_h5(self.path, what="run file ", **self.capture._open_kwargs)
            except CaptureFileError as exc:  # out of descriptors all the same: the other runs' files go first
                if not (open_runs.out_of_descriptors(exc) and open_runs.close_others(self)):
                    raise
                group = safety.open_h5(self.path, what="run file ", **self.capture._open_kwargs)
        except BaseException:
            open_runs.closed(self)
            raise
        try:
            seen = open_runs.signature(group, self.path)
            if seen is None or seen != self._checked:
                with reading(self.path):
                    weight = self.capture.readout.weight
                    attrs = layout.check_run(group, self.path, None if weight is None else len(weight))
                    # a run file copied in from another capture (or renamed) is an error, not another run's data
                    problem = safety.foreign_run(self.capture._attrs.get("capture_id"), attrs, self.index)
                    if problem is not None:
                        raise CaptureFileError(f"run file {self.path} {problem}")
                self._checked = seen
        except BaseException:
            group.close()
            open_runs.closed(self)
            raise
        self._group = group
        return group

    def close(self) -> None:
        """Close the run's file (it opens again when the run is used)."""
        with open_runs.lock:
            self._datasets.clear()  # h5py objects of the file: invalid once it is closed
            group, self._group = self._group, None
            open_runs.closed(self)
            if group is not None:
                group.close()

    @property
    def attrs(self) -> dict:
        with self.use() as group, reading(self.path):
            items = safety.read_attrs(group, self.path)
        return {k: schema.text_or(v, v.item() if isinstance(v, np.generic) else v) for k, v in items.items()}

    @property
    def loops(self) -> list[str]:
        with self.use() as group, reading(self.path):
            present = set(group[schema.LOOPS].keys())
        ordered = [name for name in self.capture.loop_names if name in present]
        return ordered + sorted(present - set(ordered))

    @cached_property
    def token_ids(self) -> np.ndarray:
        return self._array("token_ids")

    @cached_property
    def tokens(self) -> list[str] | None:
        """Each token's text (when the capture had a tokenizer), from ``token_bytes`` cut at ``token_ends``."""
        with self.use() as group:
            if "token_ends" not in group:
                return None
            ends = self._array("token_ends")
            with reading(self.path):
                data = group["token_bytes"][()].tobytes()
        # bounds first, in the stored dtype: only then is int64 exact (and np.diff of unsigned ends would wrap)
        if ends.size and (ends.min() < 0 or ends.max() > len(data)):
            raise CaptureFileError(f"{self.path}: token_ends do not fit token_bytes; damaged")
        ends = ends.astype(np.int64)
        if np.any(np.diff(ends) < 0):
            raise CaptureFileError(f"{self.path}: token_ends do not fit token_bytes; damaged")
        starts = np.concatenate([np.zeros(1, np.int64), ends[:-1]])
        return [data[a:b].decode("utf-8", "replace") for a, b in zip(starts.tolist(), ends.tolist())]

    @cached_property
    def attention_mask(self) -> np.ndarray:
        return self._array("attention_mask")

    @cached_property
    def positions(self) -> np.ndarray:
        return self._array("positions")

    @cached_property
    def forward_index(self) -> np.ndarray:
        return self._array("forward_index")

    def _array(self, name: str) -> np.ndarray:
        """A per-token dataset, read whole; checked to hold one integer per token."""
        with self.use() as group, reading(self.path):
            data = group[name][()]
        if data.shape != (self.num_tokens,) or data.dtype.kind not in "iu":
            raise CaptureFileError(f"{self.path}: dataset {name} has shape {data.shape}, dtype {data.dtype}; damaged")
        return data

    @property
    def num_tokens(self) -> int:
        with self.use() as group, reading(self.path):
            return int(group["token_ids"].shape[0])

    @property
    def num_steps(self) -> np.ndarray:
        """Iterations each token ran in the primary loop ([T] int); with a step stride, its last stored step (the
        index of its last row in :meth:`states`; :meth:`iterations_of` gives the iterations)."""
        return self.steps_of(None)

    @property
    def step_stride(self) -> int:
        """1, or n when the capture kept s0, every n-th iteration and each token's last one (``step_stride=``)."""
        stride = self.attrs.get("step_stride", 1)
        if (
            isinstance(stride, bool)
            or not isinstance(stride, (int, np.integer))
            or not 1 <= stride <= safety.MAX_STRIDE
        ):
            raise CaptureFileError(f"{self.path}: step_stride {stride!r} is damaged")
        return int(stride)

    def iterations_of(self, loop: str | None = None) -> np.ndarray:
        """Iterations each token ran in ``loop``, as recorded (``steps_of`` gives stored steps; they differ with a
        step stride; an adaptive batch row that exited between stored steps is recorded up to its last stored one)."""
        return self._num_steps(loop)[0]

    def step_iterations(self, loop: str | None = None) -> np.ndarray:
        """[T, K] the iteration each stored step holds (-1 past a token's last): ``min(k * stride, iterations)``."""
        iterations, last = self._num_steps(loop)
        with self.use():
            n_slots = self._states(loop).shape[1]
        labels = schema.stored_step_iterations(iterations, self.step_stride, n_slots)
        return np.where(np.arange(n_slots)[None, :] <= last[:, None], labels, -1)

    def steps_of(self, loop: str | None) -> np.ndarray:
        """The last stored step of each token in ``loop`` (its iteration count, or with a step stride n the slot
        that holds its last iteration); checked against the stored steps, so indexing with it is safe."""
        return self._num_steps(loop)[1]

    def _num_steps(self, loop: str | None) -> tuple[np.ndarray, np.ndarray]:
        """(iterations as recorded, last stored step), validated against the states' shape."""
        with self.use(), reading(self.path):
            group = self._loop(loop)
            iterations = group["num_steps"][()]
            n_tokens, n_slots = group["states"].shape[:2]
        if iterations.shape != (n_tokens,) or iterations.dtype.kind not in "iu":
            raise CaptureFileError(
                f"{self.path}: num_steps has shape {iterations.shape} for {n_tokens} tokens; damaged"
            )
        stride = self.step_stride
        steps = -(-iterations // stride) if stride > 1 else iterations
        if steps.size and (steps.min() < 0 or steps.max() >= n_slots):
            raise CaptureFileError(
                f"{self.path}: num_steps ranges {steps.min()}..{steps.max()} "
                f"but states hold steps 0..{n_slots - 1}; damaged"
            )
        return iterations, steps

    def step_labels(self, loop: str | None = None) -> np.ndarray | None:
        """[K, D] nested-loop labels of each stored step (HRM's L loop: its (h, l) cycle), or None."""
        with self.use(), reading(self.path):
            group = self._loop(loop)
            return group["step_labels"][()] if "step_labels" in group else None

    def signal_names(self, loop: str | None = None) -> list[str]:
        """Per-token scalars recorded beside ``loop``'s states (e.g. ``exit_gate``, ``exit_value``)."""
        with self.use(), reading(self.path):
            group = self._loop(loop)
            return sorted(group[schema.SIGNALS]) if schema.SIGNALS in group else []

    def signal(self, name: str, loop: str | None = None) -> np.ndarray:
        """[T, K] float32 values of signal ``name`` per token and step (K as the states); NaN where not recorded."""
        names = self.signal_names(loop)
        if name not in names:
            raise CaptureFileError(f"run {self.index} has no signal {name!r}; it has {names or 'none'}")
        with self.use():
            with reading(self.path):
                ds = self._loop(loop)[schema.SIGNALS][name]
                if not isinstance(ds, h5py.Dataset) or ds.ndim != 2 or ds.shape[0] != self.num_tokens:
                    raise CaptureFileError(f"{self.path}: signal {name!r} is damaged")
                virtual = ds.is_virtual
            if virtual:
                self._check_sources_once()
            with reading(self.path):
                return ds[()].astype(np.float32, copy=False)

    def dataset(self, loop: str | None = None) -> h5py.Dataset:
        """The raw states dataset [T, K, H] of ``loop`` (stored dtype; bf16 as uint16 bits). The run's file is held
        open while the object returned lives (until ``close``); ``read`` reads it checked."""
        with self.use():
            ds = h5py.Dataset(self._states(loop).id)
            open_runs.pin(self)
        weakref.finalize(ds, open_runs.unpin_later, self)
        return ds

    def _states(self, loop: str | None) -> h5py.Dataset:
        """The states dataset of ``loop``, within ``use()``: looked up and checked once per open file (a streamed
        reader asks for it once per block)."""
        ds = self._datasets.get(loop)
        if ds is not None:
            return ds
        with reading(self.path):
            ds = self._loop(loop)["states"]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 3 or ds.dtype.kind not in "fu":
                raise CaptureFileError(f"{self.path}: the states of loop {loop or self.loops[0]!r} are damaged")
            virtual = ds.is_virtual
        if virtual:
            self._check_sources_once()
        self._datasets[loop] = ds
        return ds

    def check(self) -> None:
        """Raise what a read of any of the run's datasets would, from metadata alone (no state is read): every
        loop's states checked, and where a loop's states or signals are virtual, the mappings walked (a dataset
        that maps itself, a source gone). The runs tables of ``info`` and Jupyter call it, so a run no command can
        read is never listed as sound."""
        with self.use():
            for loop in self.loops:
                self._states(loop)  # checked; virtual states have their mappings walked
                with reading(self.path):
                    signals = self._loop(loop).get(schema.SIGNALS)  # hard links only: the file's open checked them
                    virtual = isinstance(signals, h5py.Group) and any(
                        isinstance(ds, h5py.Dataset) and ds.is_virtual for ds in signals.values()
                    )
                if virtual:
                    self._check_sources_once()

    def _check_sources_once(self) -> None:
        """A merged run reads other files through virtual datasets; HDF5 would read a missing one as NaN, silently.
        Within ``use()``: checked again after each open of the run's file."""
        if not self._sources_checked:
            check_sources(self)
            self._sources_checked = True

    def logical_dtype(self, loop: str | None = None) -> str:
        with self.use():
            ds = self._states(loop)
            stored = ds.dtype.newbyteorder("=")  # a byte order HDF5 converts on read changes no value
            with reading(self.path):
                value = ds.attrs.get("logical_dtype")
        if value is None:  # not written by loopscope, which always says: floats are what they store
            value = stored.name if stored.kind == "f" else "float32"
        value = schema.text_or(value, str(value))
        try:  # each logical dtype has one stored dtype: bf16 bits in a uint32 would decode to other numbers
            expected = schema.stored_numpy_dtype(value)
        except KeyError:
            expected = None
        if expected is None or stored != expected:
            raise CaptureFileError(
                f"{self.path}: states stored as {ds.dtype} with logical dtype {safety.clean(value)!r}; damaged"
            )
        return value

    def hidden_size(self, loop: str | None = None) -> int:
        with self.use():
            return int(self._states(loop).shape[2])

    def states(
        self, token: int | None = None, step: int | None = None, *, loop: str | None = None, raw: bool = False
    ) -> np.ndarray:
        """States as a numpy array.

        ``token=i`` -> [num_steps[i] + 1, H] (s0, s1, ..., s_n); ``step=k`` -> [T, H]; both -> [H]; neither ->
        [T, K, H]. Steps past a token's last are NaN, except in an adaptive batch, where a row that exited early
        holds the iterations it was carried through while the others ran on (mask with ``steps_of``). bfloat16
        captures are widened to float32 (exact) unless ``raw=True``, which returns the stored 16-bit patterns.
        """
        with self.use():
            n_tokens, n_slots = self._states(loop).shape[:2]
        for name, value in (("token", token), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise CaptureFileError(f"{name}={value!r} must be an integer index")
        if token is not None:
            if not -n_tokens <= token < n_tokens:
                raise CaptureFileError(f"token {token} out of range: run {self.index} has {n_tokens} tokens")
            token = token % n_tokens
        if step is not None and not 0 <= step < n_slots:
            raise CaptureFileError(f"step {step} out of range: loop holds steps 0..{n_slots - 1}")
        if token is not None and step is not None:
            data = self.read(np.s_[token, step, :], loop)
        elif token is not None:
            data = self.read(np.s_[token, : int(self.steps_of(loop)[token]) + 1, :], loop)
        elif step is not None:
            data = self.read(np.s_[:, step, :], loop)
        else:
            data = self.read(np.s_[()], loop)
        return data if raw else self.decode(data, loop)

    def read(self, selection, loop: str | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """``dataset(loop)[selection]`` in the stored representation; a damaged file gives a CaptureFileError.

        ``out``: a C-contiguous array of the selection's shape and the stored dtype to read into and return. h5py
        reads a block into an existing array about 1.7x faster than into a new one, so streamed reads reuse one.
        """
        with self.use():
            ds = self._states(loop)
            return self._read(ds, selection, loop, out)

    def _read(self, ds: h5py.Dataset, selection, loop: str | None, out: np.ndarray | None) -> np.ndarray:
        with reading(self.path):
            try:
                if out is None:
                    return ds[selection]
                block = isinstance(selection, slice) and selection.step in (None, 1) and not ds.is_virtual
                if block:  # a block of tokens, as analysis streams them: chunks checked here, faster than HDF5
                    start, stop, _ = selection.indices(ds.shape[0])
                    if checksum.read_token_block(ds, start, stop, out):
                        return out
                ds.read_direct(out, selection)
                return out
            except (OSError, checksum.ChunkMismatch) as exc:  # HDF5 checks each chunk's Fletcher-32 as it reads
                if isinstance(exc, OSError) and not chunk_check_failed(exc):
                    raise
                where = f"run {self.index}, loop {loop if loop is not None else self.loops[0]}"
                raise CaptureFileError(damaged_read_message(ds, selection, where, self.capture.path)) from None

    def decode(self, data: np.ndarray, loop: str | None = None) -> np.ndarray:
        """Stored representation -> float array (bf16 bit patterns become exact float32)."""
        if self.logical_dtype(loop) == "bfloat16":
            return np.left_shift(data, 16, dtype=np.uint32).view(np.float32)  # one pass, no uint32 temporary
        return data

    def _loop(self, loop: str | None) -> h5py.Group:
        if loop is not None and not isinstance(loop, str):
            raise CaptureFileError(f"loop={loop!r} must be a loop's name; run {self.index} has {self.loops}")
        loops = self.group[schema.LOOPS]
        names = self.loops
        if loop is None:
            if not names:
                raise CaptureFileError(f"run {self.index} recorded no loop iterations (the loop never ran)")
            loop = names[0]
        if loop not in loops:
            raise CaptureFileError(f"run {self.index} has no loop {loop!r}; it has {names}")
        return loops[loop]

    def __repr__(self) -> str:
        return f"<Run {self.index}: {self.num_tokens} tokens, loops {self.loops}>"

    def _repr_html_(self) -> str:  # Jupyter: a summary, then the figures registered in display.py
        from .display import run_html

        return run_html(self)
