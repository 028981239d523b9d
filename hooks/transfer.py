"""Moving states off the model's device: host slabs laid out in chunks, and on CUDA a side stream, pinned memory and
events, so the model's stream never waits for a copy.

This is the only part of the hooks that knows about devices. On the CPU a state is copied once, straight into its
row of a slab. On CUDA the rows of a plane are gathered on the device (on the model's stream, so they are read
before the model can change them), and each full plane goes down in one contiguous copy on a side stream into
pinned memory; the writer waits on an event recorded after the copies before it reads the slab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..storage.write.buffers import HostBufferPool, PinnedScratch


@dataclass
class Stage:
    """A host slab filling with consecutive steps of one loop, sent to the writer when full. It is laid out in the
    run's chunks, [P, B, T, D, H]: P planes of D (the chunk depth) steps, plane 0 starting on a chunk boundary
    ``base``, so the writer stores each whole chunk straight from the slab (see ``writer.State``), and a plane of
    the whole batch is one contiguous block (one device-to-host copy on CUDA)."""

    slab: torch.Tensor
    base: int
    step0: int
    logical: str
    filled: int = 0
    cuda: bool = False  # whether its states come from a CUDA device (its slab is then pinned)
    on_device: torch.Tensor | None = None  # CUDA: the plane being gathered on the device, [B, T, D, H]
    device_plane: int | None = None  # which plane ``on_device`` holds rows of that are not copied down yet
    # Plain ints, read at every step: a tensor's shape read there costs more, with the model's work in between
    # pushing the hook's code and data out of the cache.
    rows: list[torch.Tensor] | None = None  # CPU: the views [B, T, H] of the slab's rows, by step - base
    depth: int = field(init=False)  # D
    capacity: int = field(init=False)  # steps the stage takes from ``step0``

    def __post_init__(self) -> None:
        self.depth = self.slab.shape[3]
        self.capacity = self.slab.shape[0] * self.depth - (self.step0 - self.base)

    def place(self, step: int) -> tuple[int, int]:
        """(plane, row within the plane) of ``step``."""
        return divmod(step - self.base, self.depth)


class DeviceTransfer:
    """Copies into host slabs from the pool: at once on the CPU, on a side stream per CUDA device otherwise."""

    def __init__(self, pool: HostBufferPool):
        self.pool = pool
        self.scratch = PinnedScratch()  # ids, masks and positions copied off a CUDA device
        self._copy_streams: dict[torch.device, Any] = {}
        self._pending_devices: set[torch.device] = set()

    def copy_step(self, stage: Stage, step: int, state: torch.Tensor) -> None:
        """Put one step's state [B, T, H] in its row of the stage. On the CPU, one copy straight into the slab. On
        CUDA the rows of a plane are gathered on the device first, and the plane goes down in one contiguous copy
        on the side stream when it is full or the stage is sent: a row of a plane is strided in host memory, and a
        strided device-to-host copy would go through a pageable temporary and block until it is done. The gather
        runs on the model's own stream, so it reads the state before anything the model queues later can change it
        in place (a side-stream read could run after such a write)."""
        if not state.is_cuda:  # ``state`` is outside autograd: no record, no grad mode needed
            if stage.rows is None:  # every row's view at once (two unbinds), not an indexing per step
                stage.rows = [row for plane in stage.slab.unbind(0) for row in plane.unbind(2)]
            stage.rows[step - stage.base].copy_(state)
            return
        plane, row = stage.place(step)
        if stage.device_plane is not None and stage.device_plane != plane:
            self.copy_plane_down(stage)
        if stage.on_device is None:  # a plane of its own: the one before may still be on its way down
            stage.on_device = torch.empty(stage.slab.shape[1:], dtype=state.dtype, device=state.device)
        stage.on_device[:, :, row].copy_(state)  # the model's stream; ``state`` is detached
        stage.device_plane = plane
        if row == stage.depth - 1:
            self.copy_plane_down(stage)

    def copy_plane_down(self, stage: Stage) -> None:
        """CUDA: the plane gathered on the device goes to its place in the pinned slab, on the side stream; the
        allocator keeps the plane's device memory until that copy is done (``copy`` records the stream)."""
        if stage.device_plane is None or stage.on_device is None:
            return
        self.copy(stage.slab[stage.device_plane], stage.on_device)
        stage.device_plane = None
        stage.on_device = None

    def copy(self, destination: torch.Tensor, state: torch.Tensor) -> None:
        """Copy into a contiguous block of a host slab. From CUDA: on a side stream, into pinned memory, without
        blocking the model's stream; the writer waits on an event recorded after the copies (``ready_event``).
        The side stream reads ``state`` after what the model's stream had queued so far, so a CUDA ``state`` must be
        loopscope's own copy, which nothing else writes."""
        if not state.is_cuda:
            destination.copy_(state)
            return
        with torch.no_grad():
            stream = self._copy_stream(state.device)
            stream.wait_stream(torch.cuda.current_stream(state.device))
            # the state's device made current first: leaving the stream context then stays on it, and does not
            # start a context on device 0 for a model that lives on another GPU
            with torch.cuda.device(state.device), torch.cuda.stream(stream):
                destination.copy_(state, non_blocking=True)
            state.record_stream(stream)
            self._pending_devices.add(state.device)

    def _copy_stream(self, device: torch.device):
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device=device)
        return stream

    def ready_event(self) -> list | None:
        """Events (one per device with copies in flight) the writer synchronises on before reading a slab."""
        if not self._pending_devices:
            return None
        events = []
        for device in self._pending_devices:
            event = torch.cuda.Event()
            event.record(self._copy_streams[device])
            events.append(event)
        self._pending_devices.clear()
        return events

    def release(self, stages) -> None:
        """Give the slabs of stages that will not be sent (an interrupted forward) back to the pool, once no copy
        into them is still running."""
        for stream in self._copy_streams.values():
            stream.synchronize()
        for stage in stages:
            self.pool.release(stage.slab)

    def to_host(self, value: torch.Tensor | np.ndarray, dtype: torch.dtype) -> torch.Tensor | np.ndarray:
        """A host copy of a forward's small per-token tensor (ids, mask, positions, a signal's values), which the
        model may reuse once the forward returns. Off a CUDA device the copy is taken on the model's stream, so
        nothing queued later can change it, and goes down into a reused pinned tensor on the side stream without
        waiting: no host synchronisation per forward (the writer waits on the message's events before reading)."""
        if isinstance(value, np.ndarray):
            return value
        if value.requires_grad:  # integer ids, masks and positions never do: one tensor operation less per forward
            value = value.detach()
        value = value.to(dtype=dtype, copy=True)
        if not value.is_cuda:
            return value
        host = self.scratch.take(tuple(value.shape), dtype)
        self.copy(host, value)
        return host
