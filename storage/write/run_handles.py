"""One open run's file as the writer thread sees it: its datasets, their token extent, the per-token metadata
waiting to be written, and the trimming that leaves the file holding exactly what was recorded.

Datasets grow in large blocks (resizing walks HDF5's chunk index) and are trimmed once, when the run completes;
per-token metadata is gathered and written ``token_chunk`` tokens at a time. The sizes and options come from the
writer (``writer.TOKEN_CHUNK``, its checksums setting), read when the run opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .. import checksum, schema
from ..safety import utf8
from .objects import DatasetMaker, create_group
from .preallocate import Reserve


@dataclass
class RunHandles:
    group: h5py.File  # the run's own file; its root is the run group
    token_chunk: int  # tokens per chunk of the per-token datasets, and per write of their metadata
    capacity: int = 0
    n_tokens: int = 0
    token_sets: dict[str, h5py.Dataset] = field(default_factory=dict)
    loops: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-token metadata waits here and is written token_chunk tokens at a time (decoding makes one token per
    # forward: writing each as it comes would cost six HDF5 calls per token).
    pending: dict[str, _Pending] = field(default_factory=dict)
    token_bytes: h5py.Dataset | None = None  # the tokens' utf-8 text, concatenated (no variable-length strings)
    token_bytes_used: int = 0
    signals: dict[str, dict[str, h5py.Dataset]] = field(default_factory=dict)  # loop -> signal name -> [T, K]
    one_forward: bool = False  # a forward() run: its first forward is all its tokens
    reserve: Reserve | None = None  # disk blocks reserved ahead of the states' writes (see preallocate.py)
    checksums: bool = True  # Fletcher-32 on the run's chunked datasets (the writer's setting)
    datasets: DatasetMaker = field(default_factory=DatasetMaker)  # the writer's, shared by its runs
    loop_groups: dict[str, h5py.Group] = field(default_factory=dict)  # loops/ ("") and loops/<name>, once made

    def __post_init__(self) -> None:
        self.loop_groups[""] = create_group(self.group, schema.LOOPS)  # empty until a loop writes

    def loop_group(self, name: str) -> h5py.Group:
        """``loops/<name>``, created at the loop's first write (of its states or of a signal)."""
        group = self.loop_groups.get(name)
        if group is None:
            group = self.loop_groups[name] = create_group(self.loop_groups[""], name)
        return group

    def grow_tokens(self, needed: int) -> None:
        """Token extent of the run's datasets: exactly its tokens for a forward() run (they all come at once, so
        nothing is trimmed at close), else grown in doubling blocks."""
        if needed <= self.capacity:
            return
        capacity = needed if self.one_forward else max(needed, 2 * self.capacity, self.token_chunk)
        for ds in self.token_sets.values():
            ds.resize((capacity,))
        for loop in self.loops.values():
            if loop["num_steps"] is not None:
                loop["num_steps"].resize((capacity,))
            states = loop["states"]
            states.resize((capacity,) + states.shape[1:])
        for signals in self.signals.values():
            for ds in signals.values():
                ds.resize((capacity, ds.shape[1]))
        self.capacity = capacity

    def add_pending(self, name: str, offset: int, values: np.ndarray) -> None:
        """Gather per-token ``values`` of dataset ``name`` from token ``offset`` (copied: the caller's arrays may go
        back to a scratch); what was gathered is written first when they do not continue it."""
        pending = self.pending.get(name)
        if pending is None:
            pending = self.pending[name] = _Pending(values.dtype, self.token_chunk)
        if not pending.fits(offset, len(values)):
            self.flush_pending()
        pending.add(offset, values)

    def flush_pending(self) -> None:
        """Write the per-token metadata gathered so far, one contiguous write per dataset. Each dataset is created
        by its first write, with its values: a run of up to token_chunk tokens writes each in one call at close."""
        self.grow_tokens(self.n_tokens)
        for name, pending in self.pending.items():
            if not pending.count:
                continue
            values, start = pending.values[: pending.count], pending.start
            pending.count = 0
            if name.startswith("loops/"):  # loops/<name>/num_steps
                loop = self.loops.get(name.split("/", 1)[1])
                if loop is None:  # the loop never ran for these tokens: nothing but s0 to say
                    continue
                loop["num_steps"] = self._token_values(loop["num_steps"], loop["group"], "num_steps", start, values)
                continue
            if name == "token_ends":
                values = self._append_token_text(values)
            self.token_sets[name] = self._token_values(self.token_sets.get(name), self.group, name, start, values)

    def _append_token_text(self, strings: np.ndarray) -> np.ndarray:
        """Append the tokens' utf-8 bytes to ``token_bytes``; returns where each token's text ends. A tokenizer's lone
        surrogate (part of a character, decoded with errors="surrogateescape") is stored as its byte, never an error
        that would lose the run (the reader decodes it as U+FFFD)."""
        encoded = [utf8(str(t)) for t in strings]
        ends = self.token_bytes_used + np.cumsum([len(e) for e in encoded], dtype=np.int64)
        new_end = int(ends[-1]) if len(ends) else self.token_bytes_used
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        if self.token_bytes is None:
            self.token_bytes = self.datasets.create(
                self.group,
                "token_bytes",
                dtype=data.dtype,
                data=data,
                maxshape=(None,),
                chunks=(16 * self.token_chunk,),
                fletcher32=self.checksums,
            )
        elif new_end > self.token_bytes_used:
            if new_end > self.token_bytes.shape[0]:
                self.token_bytes.resize((max(new_end, 2 * self.token_bytes.shape[0]),))
            self.token_bytes[self.token_bytes_used : new_end] = data
        self.token_bytes_used = new_end
        return ends

    def _token_values(self, ds, group, name: str, start: int, values: np.ndarray) -> h5py.Dataset:
        """Write per-token ``values`` at ``start`` into ``ds`` [T] (resizable, token_chunk chunks, Fletcher-32
        unless the run has no checksums); ``ds`` None: create it, holding them. Returns the dataset."""
        options: dict[str, Any] = {"maxshape": (None,), "chunks": (self.token_chunk,), "fletcher32": self.checksums}
        if ds is None and start == 0:
            return self.datasets.create(group, name, dtype=values.dtype, data=values, **options)
        if ds is None:
            ds = self.datasets.create(group, name, shape=(0,), dtype=values.dtype, **options)
        end = start + len(values)
        if end > ds.shape[0]:
            ds.resize((max(end, self.capacity),))
        ds[start:end] = values
        return ds

    def finish(self, inner_steps: dict[str, int | str]) -> None:
        """Write out what waits (assembled chunks, per-token metadata) and trim every dataset to what was recorded;
        a loop with ``inner_steps`` (nested) gets its steps' (outer, inner) labels: that many steps per outer one,
        or, given the outer loop's name, its steps over the outer loop's in this run."""
        for loop in self.loops.values():
            loop["stager"].flush_all()
        self.flush_pending()
        n = self.n_tokens
        for ds in self.token_sets.values():
            _resize(ds, (n,))
        if self.token_bytes is not None:
            _resize(self.token_bytes, (self.token_bytes_used,))
        for name, signals in self.signals.items():
            states = self.loops.get(name)
            for ds in signals.values():  # as many steps as the loop's states (at least those recorded)
                _resize(ds, (n, states["max_step"] + 1 if states else ds.shape[1]))
        for name, loop in self.loops.items():
            if loop["num_steps"] is None:  # no step counts came (HDF5 would have filled it with zeros)
                zeros = np.zeros(n, dtype=np.int32)
                options = checksum.dataset_options(zeros.shape, self.checksums, self.token_chunk)
                loop["num_steps"] = (
                    self.datasets.create(loop["group"], "num_steps", dtype=zeros.dtype, data=zeros, **options)
                    if options
                    else loop["group"].create_dataset("num_steps", data=zeros)
                )
            _resize(loop["num_steps"], (n,))
            states = loop["states"]
            _resize(states, (n, loop["max_step"] + 1, states.shape[2]))
            inner = inner_steps.get(name)
            if isinstance(inner, str):  # the outer loop's name: as many steps per outer step as this run ran
                outer = self.loops[inner]["max_step"] if inner in self.loops else 0
                inner = loop["max_step"] // outer if outer and loop["max_step"] % outer == 0 else None
            if inner:
                labels = nested_labels(loop["max_step"], inner)
                loop["group"].create_dataset(
                    "step_labels", data=labels, **checksum.dataset_options(labels.shape, self.checksums)
                )

    def drop_datasets(self) -> None:
        """Forget every dataset handle and assembled chunk, so none outlives the file (HDF5 can crash at exit on
        such orphans)."""
        for loop in self.loops.values():
            loop["stager"].drop()
        self.loops.clear()
        self.loop_groups.clear()
        self.token_sets.clear()
        self.signals.clear()


class _Pending:
    """Consecutive per-token values of one dataset, gathered in one reused array.

    One preallocated block per dataset rather than a list of small arrays: thousands of tiny long-lived arrays
    interleaved with the model's own allocations fragment the heap, and RSS grew by ~350 KB per decoded token.
    """

    def __init__(self, dtype, size: int):
        self.values = np.empty(size, dtype=dtype)
        self.start = 0
        self.count = 0

    def fits(self, offset: int, n: int) -> bool:
        return self.count == 0 or (offset == self.start + self.count and self.count + n <= len(self.values))

    def add(self, offset: int, values: np.ndarray) -> None:
        if self.count == 0:
            self.start = offset
            if len(values) > len(self.values):
                self.values = np.empty(len(values), dtype=self.values.dtype)
        self.values[self.count : self.count + len(values)] = values
        self.count += len(values)


def nested_labels(max_step: int, inner: int) -> np.ndarray:
    """[max_step + 1, 2] (outer, inner) cycle of each step of a nested loop; step 0 (s0) is (-1, -1)."""
    steps = np.arange(max_step + 1)
    labels = np.stack([(steps - 1) // inner, (steps - 1) % inner], axis=1).astype(np.int32)
    labels[0] = -1
    return labels


def _resize(ds: h5py.Dataset, shape: tuple[int, ...]) -> None:
    """Resize unless already that shape (HDF5 walks the chunk index even for a no-op resize)."""
    if ds.shape != shape:
        ds.resize(shape)
