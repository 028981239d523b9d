"""The messages the hooks hand to the writer thread: the only contract between the model's side
(``hooks/capture.py``) and the thread that owns the files (``writer.py``).

A message carries host arrays and what the writer needs to place them; the hooks never touch a file and the writer
never touches the model. Arrays copied off a CUDA device may still be landing when a message is queued: each
message waits for its own copies (``ready``) when the writer reads it, and gives borrowed host memory back once the
writer is done with it (:meth:`Message.give_back`), whether or not the write succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .buffers import HostBufferPool


class Message:
    """What every message to the writer can do once handled."""

    def give_back(self, pool: HostBufferPool) -> None:
        """Return the host memory the message borrowed (a pool's slab, pinned scratch); most borrow none."""

    def pool_bytes(self) -> int:
        """Bytes of the pool's budget the message holds until the writer gives them back."""
        return 0


@dataclass
class OpenRuns(Message):
    run_ids: list[int]
    attrs: list[dict[str, Any]]


@dataclass
class Tokens(Message):
    """A forward's tokens. The arrays are numpy arrays or host tensors; copied off a CUDA device they are pinned
    tensors still being filled on a side stream (``ready``: events to wait on), so the hook never waits for the
    device. ``keep`` selects the stored tokens here on the writer's thread; their text is ``strings``, or made here
    with ``decode`` (the tokenizer's) when the ids were still on their way; ``scratch`` takes the pinned tensors
    back once read."""

    run_ids: list[int]
    offset: int
    token_ids: Any  # [B, T] int64
    attention_mask: Any  # [B, T] int8; None: every token attended
    positions: Any  # [B, T] int64, or [1, T] for every row; an int: the first, the others counted from it
    forward_index: int
    strings: list[list[str]] | None = None
    keep: np.ndarray | None = None  # indices of the stored tokens (tokens=...), None = all
    decode: Any = None
    ready: Any = None
    scratch: Any = None

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, mask, positions) of the stored tokens, [B, T'] each, once their copies have landed."""
        _wait(self.ready)
        ids = _host_array(self.token_ids)
        batch, tokens = ids.shape
        mask = np.ones((batch, tokens), np.int8) if self.attention_mask is None else _host_array(self.attention_mask)
        if isinstance(self.positions, int):
            positions = np.arange(self.positions, self.positions + tokens, dtype=np.int64)[None]
        else:
            positions = _host_array(self.positions)
        if positions.shape[0] == 1 and batch > 1:
            positions = np.broadcast_to(positions, (batch, tokens))
        arrays = [ids, mask, positions]
        if self.keep is not None:
            arrays = [a[:, self.keep] for a in arrays]
        return arrays[0], arrays[1], arrays[2]

    def text(self, ids: np.ndarray) -> list[list[str]] | None:
        if self.strings is not None or self.decode is None:
            return self.strings
        return token_texts(ids, self.decode)

    def give_back(self, pool: HostBufferPool) -> None:
        if self.scratch is not None:
            self.scratch.give(self.token_ids, self.attention_mask, self.positions)


@dataclass
class State(Message):
    """Consecutive stored steps ``step .. step + steps - 1`` of a block of tokens of every run in a batch.

    The slab is laid out in the run's chunks: ``slab[p, b, :, d]`` is step ``base + p * D + d`` of run
    ``run_ids[b]``, P planes of D steps each. With D the chunk depth and ``base`` on a chunk boundary, every chunk
    a plane covers whole is one contiguous block of the slab, written as it is: no copy between hook and file.
    """

    run_ids: list[int]
    loop: str
    offset: int
    step: int
    slab: torch.Tensor  # [P, B, T, D, H] host tensor from the pool
    steps: int
    logical_dtype: str
    ready: Any = None  # CUDA events to wait on before reading the slab, when the copy was asynchronous
    base: int | None = None  # the step of plane 0's first row; None: ``step``
    chunks: tuple[int, int] | None = None  # (tokens, steps) per chunk, used when the run's dataset is created
    last: bool = False  # the forward's last slab of this loop: its tokens get no more steps

    @property
    def plane_start(self) -> int:
        """The step of plane 0's first row."""
        return self.step if self.base is None else self.base

    def array(self) -> np.ndarray:
        """The slab as a numpy array, once its copy has landed; bfloat16 as its raw bits (numpy has no bfloat16)."""
        _wait(self.ready)
        if self.logical_dtype == "bfloat16":
            return self.slab.view(torch.int16).numpy().view(np.uint16)
        return self.slab.numpy()

    def planes(self, row: np.ndarray):
        """(first step, [T, n, H] block) of each plane's recorded steps in ``row`` [P, T, D, H], one batch row."""
        base = self.plane_start
        planes, tokens, depth, hidden = row.shape
        end = self.step + self.steps
        if tokens == 1 and planes > 1:  # one decoded token: its planes are consecutive in memory, one block
            yield self.step, row.reshape(1, planes * depth, hidden)[:, self.step - base : end - base]
            return
        for p in range(planes):
            lo, hi = max(self.step, base + p * depth), min(end, base + (p + 1) * depth)
            if lo < hi:
                yield lo, row[p, :, lo - base - p * depth : hi - base - p * depth]

    def give_back(self, pool: HostBufferPool) -> None:
        pool.release(self.slab)

    def pool_bytes(self) -> int:
        return self.slab.nbytes


@dataclass
class Steps(Message):
    """How many steps a forward's stored tokens ran: ``ran`` each, or ``per_row[b]`` for every token of row b
    where rows exited on their own (Huginn's adaptive exit). Plain numbers, made into arrays on the writer's
    thread: the message is made once per decoded token, where every array operation costs."""

    run_ids: list[int]
    loop: str
    offset: int
    tokens: int
    ran: int
    per_row: np.ndarray | None = None  # [B]

    def counts(self, b: int) -> np.ndarray:
        """[T] int32: the step count of each of row ``b``'s tokens."""
        value = self.ran if self.per_row is None else self.per_row[b]
        return np.full(self.tokens, value, dtype=np.int32)


@dataclass
class Signal(Message):
    """A per-token scalar recorded beside a loop's states (an exit gate, an exit criterion's value):
    ``values[b, :, j]`` is step ``step + j`` of ``run_ids[b]``'s tokens ``offset ..``; NaN where not recorded."""

    run_ids: list[int]
    loop: str
    name: str
    offset: int
    step: int
    values: Any  # [B, T, K] float32, a numpy array or a host tensor (pinned, still landing, as in Tokens)
    slots: np.ndarray | None = None  # values[..., j] is step ``step + slots[j]`` (NaN between); None: ``step + j``
    ready: Any = None
    scratch: Any = None

    def block(self) -> np.ndarray:
        """[B, T, K] over consecutive steps from ``step``, once the copy has landed."""
        _wait(self.ready)
        values = _host_array(self.values)
        if self.slots is None:
            return values
        block = np.full(values.shape[:2] + (int(self.slots.max()) + 1,), np.nan, dtype=np.float32)
        block[:, :, self.slots] = values
        return block

    def give_back(self, pool: HostBufferPool) -> None:
        if self.scratch is not None:
            self.scratch.give(self.values)


@dataclass
class CloseRuns(Message):
    """End runs: trim datasets to what was written, flush. ``complete=False`` marks runs cut short by an error."""

    run_ids: list[int]
    complete: bool = True
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch(Message):
    """Messages put together (a forward's closing ones), handled in order: one queue operation and one wake-up of
    the writer for all of them."""

    items: list[Message]

    def give_back(self, pool: HostBufferPool) -> None:
        for item in self.items:
            item.give_back(pool)


def token_texts(ids, decode) -> list[list[str]]:
    """Each token's own text, [B, T] ids (a tensor or an array); -1 (an embedded input without an id) has none."""
    return [[decode([int(i)]) if i >= 0 else "" for i in row] for row in ids.tolist()]


def _host_array(value) -> np.ndarray:
    return value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _wait(events) -> None:
    """Wait for the CUDA events a message's host copies were recorded with (None: copies already done)."""
    for event in events or ():
        event.synchronize()
