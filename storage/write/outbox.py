"""The model's side of the writer's queue: messages held back and sent together, so that decoding wakes the writer
once per several tokens instead of once per token.

Messages wait here in two ways before they are queued:

* put inside ``together()`` (a forward's closing messages), they become one :class:`Batch` when the block ends;
* such a batch is then *deferred*, and sent with those of the next forwards: at ``DEFER_BATCHES`` of them, or once
  their slabs reach ``DEFER_BYTES``, or as soon as anything else is put, or the queue is drained or closed (so
  the writer sees every message in the order it was put).

Why: every wake-up of the writer hands the GIL over from the model's thread and back, and decoding a small model
spends its time in Python, where it waits for the GIL. Sending 16 decoded tokens at once cut loopscope's extra
wall time per token by 11-36 % on the tiny reference model (interleaved runs, ``benchmarks/README.md``). A
prefill's slabs pass the byte limit at once, so prefill is sent as before.

Deferred slabs still count in the pool's budget: a slab request that would wait first sends what is deferred
(``HostBufferPool.before_wait``), so the writer can give those slabs back and the wait can never be on itself.
Only the model's thread uses an outbox.
"""

from __future__ import annotations

import queue

from .messages import Batch, Message

DEFER_BATCHES = 16  # forwards' closing batches sent as one (decoded tokens)
DEFER_BYTES = 1 << 20  # ... or fewer, once their slabs hold this much (a prefill's are sent at once)


class _Together:
    """The ``with`` block of :meth:`Outbox.together`: a class, since it runs once per decoded token and a
    generator-based context manager costs several times more."""

    __slots__ = ("_outbox",)

    def __init__(self, outbox: Outbox):
        self._outbox = outbox

    def __enter__(self) -> None:
        self._outbox.hold()

    def __exit__(self, *exc_info) -> None:
        self._outbox.end_hold()


class Outbox:
    """Messages on their way from the model's thread into the writer's queue."""

    def __init__(self, destination: queue.Queue, *, defer_batches: int = DEFER_BATCHES, defer_bytes: int = DEFER_BYTES):
        self._queue = destination
        self.defer_batches = defer_batches
        self.defer_bytes = defer_bytes
        self._held: list[Message] | None = None  # inside together()
        self._deferred: list[Message] = []
        self._deferred_batches = 0
        self._deferred_bytes = 0

    def put(self, message) -> None:
        """Queue a message after everything deferred (blocks when the queue is full); inside :meth:`together`,
        hold it back for the block's batch."""
        if self._held is not None:
            self._held.append(message)
            return
        self.push()
        self._queue.put(message)

    def together(self) -> _Together:
        """Messages put inside the ``with`` block go to the writer as one batch, deferred (also when the block
        raises). Only around code that never waits for the writer: what it put is not queued yet."""
        return _Together(self)

    def hold(self) -> None:
        self._held = []

    def end_hold(self) -> None:
        held, self._held = self._held, None
        if not held:
            return
        self._deferred.extend(held)
        self._deferred_batches += 1
        self._deferred_bytes += sum(m.pool_bytes() for m in held)
        if self._deferred_batches >= self.defer_batches or self._deferred_bytes >= self.defer_bytes:
            self.push()

    def push(self) -> None:
        """Queue what is deferred, as one batch (blocks when the queue is full)."""
        if not self._deferred:
            return
        items, self._deferred = self._deferred, []
        self._deferred_batches = self._deferred_bytes = 0
        self._queue.put(items[0] if len(items) == 1 else Batch(items))
