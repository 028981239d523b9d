"""Host staging buffers with a hard memory budget.

The hook copies each iteration's state into a preallocated host slab and hands the slab to the writer thread; the
writer gives it back once the bytes are in HDF5. Slabs are reused by shape, so a long generation allocates a few
slabs once and then recycles them: extra host memory stays under ``budget_bytes`` however many tokens are captured.
When every slab is in flight the hook waits (back-pressure); the waits are counted and reported at close.

Slabs that receive copies from a CUDA device are pinned, so the copy runs at full bandwidth without blocking
(a ``non_blocking`` copy into pageable memory is synchronous); the caller says which, per slab, from the state's
own device, so a model moved to the GPU after ``attach`` (or one with no parameters) is still copied asynchronously.
PyTorch's pinned-memory cache gives each request a power-of-two block and keeps freed blocks, so a pinned slab
counts at that block's size, and closing the pool hands the cache's idle blocks back to the system.

Every buffer is made outside inference mode: one made inside it would be an inference tensor, which a later
forward run outside inference mode may not copy into.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BufferStats:
    """What the pool did: reported in the capture file and by ``Capture.close()``."""

    allocated_bytes: int = 0
    peak_bytes: int = 0
    slabs_allocated: int = 0
    slabs_reused: int = 0
    waits: int = 0
    wait_seconds: float = 0.0


class HostBufferPool:
    """A budgeted pool of host tensors keyed by (shape, dtype)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = int(budget_bytes)
        self.stats = BufferStats()
        # The pinned slabs, by id (a weak map: a dropped slab leaves no entry). ``Tensor.is_pinned()`` is not asked:
        # on a machine with a GPU it can start a CUDA context for a capture that never touches the GPU.
        self._pinned: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._lock = threading.Condition()
        self._closed = False
        self._pinned_any = False
        # Called before a wait for a slab, without the lock held: the capture sends the messages it defers, whose
        # slabs the writer then gives back (see storage/write/outbox.py).
        self.before_wait: Callable[[], None] | None = None

    def max_slab_bytes(self, pinned: bool = False) -> int:
        """The largest slab one hook call may take; larger states are split along the token axis. A pinned slab
        stays within a power of two, the block it takes (see :func:`_held_bytes`)."""
        limit = max(self.budget_bytes // 4, 1)
        return 1 << (limit.bit_length() - 1) if pinned else limit

    def acquire(self, shape: tuple[int, ...], dtype: torch.dtype, pinned: bool = False) -> torch.Tensor:
        """A host tensor of ``shape``/``dtype`` (page-locked if ``pinned``) to copy into; blocks while the budget
        is used up, after calling ``before_wait`` (outside the lock)."""
        key = (tuple(shape), dtype, pinned)
        nbytes = _held_bytes(_nbytes(shape, dtype), pinned)
        with self._lock:
            slab = self._take(key, nbytes)
        if slab is not None:
            return slab
        if self.before_wait is not None:
            self.before_wait()
        with self._lock:
            waited_since = None
            while (slab := self._take(key, nbytes)) is None:
                if waited_since is None:
                    waited_since = time.perf_counter()
                    self.stats.waits += 1
                self._lock.wait(timeout=1.0)
            if waited_since is not None:
                self.stats.wait_seconds += time.perf_counter() - waited_since
            return slab

    def _take(self, key: tuple[tuple[int, ...], torch.dtype, bool], nbytes: int) -> torch.Tensor | None:
        """A free slab of ``key``, or a new one within the budget (idle slabs of other shapes dropped to make
        room), or past it once the pool is closed; None when the caller has to wait. Under the lock."""
        while True:
            if self._free[key]:
                self.stats.slabs_reused += 1
                return self._free[key].pop()
            if self.stats.allocated_bytes + nbytes <= self.budget_bytes or self.stats.allocated_bytes == 0:
                return self._allocate(key, nbytes)
            if self._drop_free_slab():
                continue  # freed an idle slab of another shape; try again
            if self._closed:
                return self._allocate(key, nbytes)
            return None

    def release(self, slab: torch.Tensor) -> None:
        """Give a slab back once its bytes are written."""
        with self._lock:
            self._free[(tuple(slab.shape), slab.dtype, self._pinned.get(id(slab)) is slab)].append(slab)
            self._lock.notify_all()

    def close(self) -> None:
        """Drop every slab and wake any waiter (it then allocates past the budget rather than hang)."""
        with self._lock:
            self._closed = True
            self._free.clear()
            self.stats.allocated_bytes = 0
            self._lock.notify_all()
            pinned_any, self._pinned_any = self._pinned_any, False
        if pinned_any:
            empty_pinned_cache()

    def _allocate(self, key: tuple[tuple[int, ...], torch.dtype, bool], nbytes: int) -> torch.Tensor:
        shape, dtype, pinned = key
        with torch.inference_mode(False):
            slab = torch.empty(shape, dtype=dtype, pin_memory=pinned)
        if pinned:
            self._pinned[id(slab)] = slab
            self._pinned_any = True
        self.stats.slabs_allocated += 1
        self.stats.allocated_bytes += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.allocated_bytes)
        return slab

    def _drop_free_slab(self) -> bool:
        for (shape, dtype, pinned), slabs in self._free.items():
            if slabs:
                slabs.pop()
                self.stats.allocated_bytes -= _held_bytes(_nbytes(shape, dtype), pinned)
                return True
        return False


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def _held_bytes(nbytes: int, pinned: bool) -> int:
    """Host memory a slab holds: pinned blocks come from PyTorch's cache in powers of two."""
    return 1 << (nbytes - 1).bit_length() if pinned and nbytes > 1 else nbytes


def empty_pinned_cache() -> None:
    """Hand PyTorch's idle pinned blocks back to the system (process-wide; blocks in use are kept)."""
    empty = getattr(getattr(torch, "accelerator", None), "memory", None)
    empty = getattr(empty, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class PinnedScratch:
    """Small pinned host tensors (a forward's token ids, mask and positions) for copies off a CUDA device that do
    not block: reused by shape, outside the slab budget (bytes per token, not kilobytes), and at most ``keep`` of a
    shape are held. The writer gives them back once read; one that is never given back is simply freed."""

    def __init__(self, keep: int = 24, shapes: int = 32):  # keep: decoded tokens deferred (outbox.py) and more
        self.keep = keep
        self.shapes = shapes
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._mine: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()  # as in the pool
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._lock:
            free = self._free.get((tuple(shape), dtype))
            if free:
                return free.pop()
        with torch.inference_mode(False):
            t = torch.empty(shape, dtype=dtype, pin_memory=True)
        with self._lock:
            self._mine[id(t)] = t
        return t

    def give(self, *tensors) -> None:
        """Take back those of ``tensors`` that came from here (others, such as host arrays, are ignored)."""
        with self._lock:
            for t in tensors:
                if t is None or self._mine.get(id(t)) is not t:
                    continue
                assert isinstance(t, torch.Tensor)
                key = (tuple(t.shape), t.dtype)
                if key not in self._free and len(self._free) >= self.shapes:  # prompts of many lengths: forget one
                    self._free.pop(next(iter(self._free)))
                free = self._free.setdefault(key, [])
                if len(free) < self.keep:
                    free.append(t)
