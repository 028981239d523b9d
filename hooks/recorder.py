"""From one state (or signal value) seen by a hook to writer messages: checks, dtype, chunk shape, and the stage
that gathers consecutive steps of a loop so that the writer stores whole chunks.

One state per loop and step arrives here; it is checked (shape, width, one dtype per loop), reduced to the stored
tokens where it lives, and copied into a stage (``transfer.py``). A stage full of steps, or the end of a forward,
sends one :class:`~loopscope.storage.write.messages.State` message. Signals (per-token scalars such as an exit
gate's logit) are kept per forward and sent together when it ends.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ..errors import LoopscopeError
from ..families.adapter import LoopSpec
from ..storage import schema
from ..storage.write import messages
from . import options, selection
from .forwards import Forward, Session
from .transfer import DeviceTransfer, Stage

#: Logical dtype name stored in the file for each torch dtype a state may have.
LOGICAL_DTYPES = {
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.float32: "float32",
    torch.float64: "float64",
}


class StateRecorder:
    """Turns the states and signals of the current forward into stages and messages for the writer."""

    def __init__(
        self,
        transfer: DeviceTransfer,
        put: Callable[[object], None],
        *,
        stride: int,
        cast: torch.dtype | None,
        chunks: tuple[int, int] | None,
    ):
        self.transfer = transfer
        self.pool = transfer.pool
        self._put = put
        self._stride = stride
        self._cast = cast
        self._chunks = chunks
        self._loop_dtypes: dict[str, torch.dtype] = {}  # per run: one stored dtype per loop, the first it recorded
        self._loop_widths: dict[str, int] = {}  # per run: the state size of each loop, from its first state
        self._steps_hint: dict[str, int] = {}  # steps each loop ran in the previous forward: sizes the next stage

    def new_runs(self) -> None:
        """New runs begin: each run file holds one dtype and one width per loop, and a new run may have others."""
        self._loop_dtypes.clear()
        self._loop_widths.clear()

    # ---- states --------------------------------------------------------------------------------------------------
    def record(self, session: Session, forward: Forward, spec: LoopSpec, step: int, state: torch.Tensor) -> None:
        # Called at every step: each tensor operation here is paid once per step and token. A state outside
        # autograd is copied as it is (``detach()`` would be one operation more), its shape read once.
        if state.requires_grad:
            state = state.detach()
        shape = state.shape
        if len(shape) == 2 and forward.batch == 1:
            state = state.unsqueeze(0)
            shape = state.shape
        if len(shape) != 3 or shape[0] != forward.batch or shape[1] != forward.tokens:
            raise LoopscopeError(
                f"loop {spec.exit!r} produced a state of shape {tuple(shape)}, expected "
                f"({forward.batch}, {forward.tokens}, hidden); pass loop= with the module that outputs the state"
            )
        width = self._loop_widths.setdefault(spec.name, shape[2])
        if shape[2] != width:  # s0 and the iterations must be one state, of one size
            raise LoopscopeError(
                f"loop {spec.exit!r} produced states {shape[2]} wide after {width}-wide ones (s0 included); "
                "pass loop= with the module whose output is the loop's state"
            )
        state = forward.select(state)
        if self._cast is not None and state.dtype != self._cast:
            state = state.to(self._cast)
        state = self._one_dtype(spec, state)
        logical = LOGICAL_DTYPES.get(state.dtype)
        if logical is None:
            raise LoopscopeError(f"loop {spec.exit!r} produced {state.dtype} states; only floating point is recorded")
        chunk_tokens, depth = self._chunk_shape(session, spec, state)
        stage = forward.stages.get(spec.name)
        # a stage holds consecutive steps from one kind of device: a CPU s0 before CUDA iterations (an offloaded
        # embedding) goes in a stage of its own, and the iterations in a pinned one
        if stage is not None and (
            stage.filled == stage.capacity or step != stage.step0 + stage.filled or state.is_cuda != stage.cuda
        ):
            self._send_stage(session, forward, spec.name, stage)
            stage = None
        if stage is None:
            plane = state.numel() * state.element_size() * depth
            room = self.pool.max_slab_bytes(state.is_cuda)
            if plane > room:
                self._record_split(session, spec, step, state, logical, chunk_tokens)
                return
            # As many planes as the last forward of this loop ran steps (all of them, for decoding), within the
            # slab limit: one message and one HDF5 write per chunk for the whole group instead of one per step.
            base = step - step % depth
            expected = self._steps_hint.get(spec.name, 8) + 1  # slots of the forward, s0 included
            planes = max(1, min(-(-(expected - base) // depth), room // plane))
            slab_shape = (planes, forward.batch, forward.stored, depth, width)
            slab = self.pool.acquire(slab_shape, state.dtype, state.is_cuda)
            stage = forward.stages[spec.name] = Stage(slab, base, step, logical, cuda=state.is_cuda)
        self.transfer.copy_step(stage, step, state)
        stage.filled += 1

    def record_finals(self, session: Session, forward: Forward, loops: tuple[LoopSpec, ...]) -> None:
        """With ``step_stride``: a token's last iteration is always stored, one slot after the last on-stride one,
        so s* (the final state) is never lost. ``selection.iteration_of`` maps slots back to iterations."""
        for spec in loops:
            held = forward.final.get(spec.name)
            if held is None or held[0] != forward.steps.get(spec.name, 0):
                continue
            step, state = held
            self.record(session, forward, spec, step // self._stride + 1, state)
        forward.final.clear()

    def _chunk_shape(self, session: Session, spec: LoopSpec, state: torch.Tensor) -> tuple[int, int]:
        """(tokens, steps) per chunk of this loop's states in the current runs, fixed at its first state: the
        ``chunks=`` option, else sized from the data (see ``schema.state_chunks``) so that one chunk depth of this
        forward's tokens fits one slab."""
        chunks = session.chunks.get(spec.name)
        if chunks is None:
            if self._chunks is not None:
                chunks = self._chunks
                options.check_chunk_bytes(chunks, state.shape[2], state.element_size())  # HDF5: under 4 GiB
            else:
                hint = self._steps_hint.get(spec.name)
                slots = hint + 1 if hint else None
                step_bytes = state.numel() * state.element_size()
                chunk_tokens, depth, _ = schema.state_chunks(
                    state.shape[2],
                    state.element_size(),
                    slots,
                    state.shape[1],
                    more_tokens=session.call != "forward",
                    max_depth=max(1, self.pool.max_slab_bytes(state.is_cuda) // step_bytes),
                )
                chunks = (chunk_tokens, depth)
            session.chunks[spec.name] = chunks
        return chunks

    def _one_dtype(self, spec: LoopSpec, state: torch.Tensor) -> torch.Tensor:
        """Every state of a loop in a run is stored in one dtype, the first it recorded (s0 from float32
        embeddings, then float16 iterations under autocast: the iterations are widened, exactly). A wider dtype
        after a narrower one would have to be rounded: that is an error naming the option that avoids it."""
        pinned = self._loop_dtypes.setdefault(spec.name, state.dtype)
        if state.dtype == pinned:
            return state
        if state.is_floating_point() and torch.finfo(pinned).bits > torch.finfo(state.dtype).bits:
            return state.to(pinned)
        raise LoopscopeError(
            f"loop {spec.exit!r} produced {str(state.dtype).replace('torch.', '')} states after "
            f"{str(pinned).replace('torch.', '')} ones; pass dtype='float32' to attach() to store one dtype"
        )

    def _record_split(
        self, session: Session, spec: LoopSpec, step: int, state: torch.Tensor, logical: str, chunk_tokens: int
    ) -> None:
        """A chunk depth of this forward's tokens is larger than a slab (a long prefill): send each step at once,
        in blocks of whole chunks' tokens where a block holds any."""
        batch, tokens, hidden = state.shape
        block = max(self.pool.max_slab_bytes(state.is_cuda) // (batch * hidden * state.element_size()), 1)
        if block > chunk_tokens:
            block -= block % chunk_tokens
        for t0 in range(0, tokens, block):
            t1 = min(t0 + block, tokens)
            slab = self.pool.acquire((1, batch, t1 - t0, 1, hidden), state.dtype, state.is_cuda)
            piece = state[:, t0:t1]
            # on CUDA a copy taken on the model's stream goes down, not the state, which the model may change later
            self.transfer.copy(slab[0, :, :, 0], piece.clone() if piece.is_cuda else piece)
            self._put(
                messages.State(
                    session.run_ids,
                    spec.name,
                    session.offset + t0,
                    step,
                    slab,
                    1,
                    logical,
                    self.transfer.ready_event(),
                    chunks=session.chunks[spec.name],
                )
            )

    def _send_stage(self, session: Session, forward: Forward, loop: str, stage: Stage, last: bool = False) -> None:
        self.transfer.copy_plane_down(stage)
        self._put(
            messages.State(
                session.run_ids,
                loop,
                session.offset,
                stage.step0,
                stage.slab,
                stage.filled,
                stage.logical,
                self.transfer.ready_event(),
                base=stage.base,
                chunks=session.chunks[loop],
                last=last,
            )
        )
        forward.stages.pop(loop, None)

    def flush_stages(self, session: Session, forward: Forward) -> None:
        """The forward ended: send every stage, and remember how many steps each loop ran (sizes the next ones)."""
        for loop, stage in list(forward.stages.items()):
            self._send_stage(session, forward, loop, stage, last=True)
        for name, steps in forward.steps.items():  # slots this loop filled: s0 excluded, as the hint expects
            self._steps_hint[name] = -(-steps // self._stride)

    # ---- signals -------------------------------------------------------------------------------------------------
    def add_signal(self, forward: Forward, spec: LoopSpec, signal: str, step: int, value: torch.Tensor) -> None:
        """Keep a per-token scalar for this forward; they go to the writer together when the forward ends."""
        if not forward.stored:
            return
        if value.dim() == 3 and value.shape[-1] == 1:
            value = value[..., 0]
        if value.dim() == 1 and forward.batch == 1:
            value = value.unsqueeze(0)
        if tuple(value.shape) != (forward.batch, forward.tokens):
            raise LoopscopeError(
                f"signal {signal!r} of loop {spec.name!r} has shape {tuple(value.shape)}; expected one value per "
                f"token ({forward.batch}, {forward.tokens}) or ({forward.batch}, {forward.tokens}, 1)"
            )
        kept = forward.select(value).float()
        forward.signals.setdefault((spec.name, signal), []).append((step, kept.clone() if kept is value else kept))

    def flush_signals(self, session: Session, forward: Forward) -> None:
        """One message per signal and forward: its values at the steps it was seen at, in one host copy (off a CUDA
        device without waiting); the writer lays them out over consecutive steps."""
        for (loop, signal), entries in forward.signals.items():
            ran = forward.steps.get(loop, 0)
            slotted = [(selection.slot_of(step, ran, self._stride), v) for step, v in entries]
            kept = [(slot, v) for slot, v in slotted if slot is not None]  # off-stride steps are not stored
            if not kept:
                continue
            slots = np.asarray([slot for slot, _ in kept])
            first = int(slots.min())
            values = self.transfer.to_host(torch.stack([v for _, v in kept], dim=-1), torch.float32)  # no wait
            self._put(
                messages.Signal(
                    session.run_ids,
                    loop,
                    signal,
                    session.offset,
                    first,
                    values,
                    slots=slots - first,
                    ready=self.transfer.ready_event(),
                    scratch=self.transfer.scratch,
                )
            )
        forward.signals.clear()
