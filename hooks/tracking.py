"""Sessions, forwards and steps: what the model's calls mean, turned into writer messages. Knows nothing of devices.

Labels are the point of the product, so this module owns them:

* a *run* is one batch row of one call: ``forward()``, ``generate()`` (prefill and every decoded token in order) or
  a method the adapter names (``call_methods``, e.g. Huginn's ``forward_with_adaptive_compute``);
* within one forward of the model, the exit module's k-th call is step k of every token that forward computes;
  step 0 is s0, read before the first iteration. Decoding loops that bypass ``forward()`` (Huginn's adaptive
  exit) are grouped by the adapter's ``entry_methods`` instead: each call starts the next group of tokens;
* token ids come from the forward's ``input_ids``; positions from ``cache_position``/``position_ids``; ``tokens=``
  and ``step_stride=`` choose what is stored (``selection.py``), on the device, before any copy;
* ``model.forward(...)`` called directly is recorded as ``model(...)`` is; one thread's calls at a time (threads.py).

Hooks only read tensors (detached, copied into host slabs): outputs are bit-identical with and without loopscope.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..errors import CaptureWriteError, LoopscopeError
from ..families.adapter import LoopAdapter, LoopSpec
from ..storage.write import descriptors, messages
from ..storage.write.writer import CaptureWriter
from . import forwards, install, selection
from .forwards import Forward, Session
from .install import Switchable
from .recorder import StateRecorder
from .threads import ThreadGate
from .transfer import DeviceTransfer
from .user_frames import user_stacklevel


class Tracker(install.NotCopied):
    """The hook callbacks of one capture: which run, forward and step each call of the model and its loop is."""

    def __init__(
        self,
        model: nn.Module,
        adapter: LoopAdapter,
        writer: CaptureWriter,
        transfer: DeviceTransfer,
        *,
        tokenizer,
        tokens: selection.TokenSelection,
        stride: int,
        cast: torch.dtype | None,
        chunks: tuple[int, int] | None,
        next_run: int,
        abort: Callable[[BaseException], None],
    ):
        self.model = model
        self.adapter = adapter
        self.writer = writer
        self.transfer = transfer
        self.recorder = StateRecorder(transfer, self.put, stride=stride, cast=cast, chunks=chunks)
        self._token_records = forwards.TokenRecords(transfer, tokenizer)
        self.abort = abort  # stops the capture after an error; the caller re-raises
        self.closed = False
        self.orphan_calls = 0  # loop calls outside any forward: counted, not recorded
        self._tokens = tokens
        self._stride = stride
        self._next_run = next_run
        self._session: Session | None = None
        self._forward: Forward | None = None
        self._in_call = 0  # depth of generate()/call_methods calls; the outermost one makes the runs
        self._call_name = "forward"
        self._call_inputs: forwards.CallInputs | None = None  # of the outermost generate()/call method running
        self._side_groups = False  # whether entry-method calls start groups of tokens in the current call
        self._in_forward = 0  # depth of the model's forward() calls running now
        self._nested = 0  # depth of model calls made inside its own forward(), which are not recorded
        self._warned: set[str] = set()  # what was named once (a warning) and is not named again
        self._unread: set[str] = set()  # what a family's exit evaluator returned that could not be read
        self._hooked = False  # the model's pre-hook began the forward that forward_call is about to run
        self.gate = ThreadGate()  # one thread's calls are recorded at a time; other threads' run unrecorded
        # per loop: its entry hook, on from the start of each forward until it has read s0 (see install.Switchable);
        # and what puts the other state hooks back behind hooks registered since, then (install.Installed.keep_last)
        self.entry_switches: dict[str, Switchable] = {}
        self.keep_hooks_last: Callable[[], None] = lambda: None

    # ---- calls of the model (wrappers around its methods) ------------------------------------------------------------
    def forward_call(self, original, *args, **kwargs):
        """The model's forward(): called by ``model(...)``, whose pre-hook began the forward, or directly (peft's
        LoRA wrapper calls ``model.forward``), which begins and finishes it here just as the hooks would."""
        if self.closed:
            return original(*args, **kwargs)
        if not self.gate.this_thread.owns and not self.gate.claim():  # another thread's call is being recorded:
            return self.gate.unrecorded(original, args, kwargs, forward=True)  # this one runs, unrecorded
        if direct := not self._hooked:  # no pre-hook ran: model.forward(...) called directly
            self.on_model_enter(self.model, args, kwargs)
        self._hooked = False
        self._in_forward += 1
        try:
            output = original(*args, **kwargs)
        except BaseException as exc:
            self.abort(exc)
            raise
        finally:
            self._in_forward -= 1
        if direct:
            self.on_model_exit(self.model, args, kwargs, output)
        return output

    def whole_call(self, name: str, original, *args, **kwargs):
        """generate() (or an adapter's call method): everything it computes is one run per batch row."""
        if self.closed:
            return original(*args, **kwargs)
        if not self.gate.claim():  # another thread's call is being recorded: this one runs, unrecorded
            return self.gate.unrecorded(original, args, kwargs, forward=False)
        if self._in_call or self._in_forward:  # a generate() calling generate() (a dispatcher) is one call; one
            return original(*args, **kwargs)  # run inside the model's forward is not recorded
        try:
            return self._record_call(name, original, args, kwargs)
        finally:
            self.gate.release()

    def _record_call(self, name: str, original, args, kwargs):
        if name == "generate":  # num_beams > 1, assisted decoding: one line, before anything runs
            forwards.refuse_unfollowable_generate(self.model, args, kwargs)
        self._call_inputs = forwards.CallInputs.of(args, kwargs)  # prompt length and 2-D mask, once per call
        self._in_call += 1  # after: nothing between here and the try below may raise (the count would stay up)
        self._call_name = name
        # Only decoding loops the adapter describes group tokens by entry-method calls (Huginn: adaptive exit);
        # others that bypass forward() (Huginn's diffusion-style sampler) leave their loop calls unrecorded.
        self._side_groups = name in self.adapter.call_methods or any(
            k in kwargs for k in self.adapter.exit_evaluator_kwargs
        )
        try:
            if self.adapter.watch_call is not None:  # the family learns each row's own exit step (Huginn)
                args, kwargs = self.adapter.watch_call(self.model, args, kwargs, self.on_exit_check)
            result = original(*args, **kwargs)
        except BaseException as exc:
            self._in_call, self._call_inputs = self._in_call - 1, None
            self.abort(exc)
            raise
        self._in_call, self._call_inputs = self._in_call - 1, None  # the session keeps what it needs of the call
        self._side_groups = False
        if self._forward is not None and self._forward.side:
            self._finish_forward()
        if self._session is not None:
            self.end_session(complete=True)
        for problem in sorted(self._unread):
            self._warn_once(problem)
        return result

    def side_entry(self, original, *args, **kwargs):
        """An entry method (Huginn's ``embed_inputs``): inside forward() nothing happens; inside generate() a call
        begins a new group of tokens, whose iterations are the loop calls until the next group begins."""
        inside = self._forward is not None and not self._forward.side  # in forward(): nothing to do
        if inside or self.closed or not self._side_groups or not self.gate.this_thread.owns:
            return original(*args, **kwargs)  # loop calls outside any call stay orphans (counted, not recorded)
        try:
            if self._forward is not None:
                self._finish_forward()
            self._begin_forward(args, kwargs, side=True)
            return original(*args, **kwargs)
        except BaseException as exc:
            self.abort(exc)
            raise

    def on_exit_check(self, exits, values) -> None:
        """A family's exit evaluator decided (``exits``) on ``values``: each row's exit step, signal ``exit_value``."""
        forward = self._forward
        if forward is None or self.closed:
            return
        spec = self.adapter.loops[0]
        step = forward.steps.get(spec.name, 0)
        try:  # inside the model's decoding loop: what a user's evaluator returns is never raised into it
            signal, problem = forwards.note_exit_check(forward, step, exits, values)
            if signal is not None:
                self.recorder.add_signal(forward, spec, "exit_value", step, signal)
        except Exception as exc:
            problem = f"the exit evaluator's check could not be recorded ({type(exc).__name__}: {exc})"
        if problem is not None:  # named once the call returns, at the caller's line (not in the model's code)
            self._unread.add(problem)

    # ---- the model's own forward (pre- and post-hooks on the model) --------------------------------------------------
    def on_model_enter(self, module, args, kwargs):
        if not self.gate.this_thread.owns and not self.gate.claim():  # another thread's call is being recorded
            return
        self._hooked = True
        if self._in_forward:  # the model called inside its own forward (from a hook, say): not recorded, and the
            self._nested += 1  # outer forward goes on as if it had not happened
            if self._nested == 1:
                self._warn_once("a call of the model inside its own forward() is not recorded")
            return
        if self._forward is not None and self._forward.side:  # a group computed outside forward() ends here
            self._finish_forward()
        elif self._forward is not None:  # the previous forward raised before finishing: its runs are incomplete
            if self._session is not None:
                self.end_session(complete=False)  # also gives the interrupted forward's staged slabs back
            self._forward = None
        try:
            self._begin_forward(args, kwargs)
        except BaseException:  # no inputs to record (one line): the call ends here, the capture goes on
            self._hooked = False
            if not self._in_call:
                self.gate.release()
            raise

    def on_model_exit(self, module, args, kwargs, output):
        if not self.gate.this_thread.owns:  # a forward of another thread, not recorded
            return
        if self._nested:
            self._nested -= 1
            return
        if self._forward is not None and not self._forward.side:
            try:  # a forward hook runs after forward() returned, outside the wrapper that aborts on errors
                self._finish_forward()
            except BaseException as exc:
                self.abort(exc)
                raise
        if not self._in_call and not self._in_forward:
            self.gate.release()

    def _begin_forward(self, args, kwargs, side: bool = False) -> None:
        self.check_writer()
        ids = forwards.token_ids(args, kwargs)
        batch, tokens = ids.shape
        if self._session is None:
            call = self._call_name if self._in_call else "forward"
            descriptors.make_room(batch)  # one run file per row, open at once (one line where that cannot be)
            run_ids = list(range(self._next_run, self._next_run + batch))
            self._next_run += batch
            inputs = self._call_inputs if self._in_call else None
            arguments = inputs.arguments if inputs is not None else forwards.call_arguments(kwargs)
            attrs = {"call": call, "batch_size": batch, "loops": [s.name for s in self.adapter.loops]}
            attrs.update(step_stride=self._stride, call_arguments=arguments)
            opening = messages.OpenRuns(run_ids, [{**attrs, "batch_row": b} for b in range(batch)])
            self._session = Session(call=call, run_ids=run_ids, open_message=opening, inputs=inputs)
            self.recorder.new_runs()
        session = self._session
        if len(session.run_ids) != batch:
            raise LoopscopeError(
                f"batch size changed from {len(session.run_ids)} to {batch} inside one generate() call; "
                "loopscope records one run per batch row and cannot follow rows being dropped"
            )
        fed_back = bool(self._in_call) and self._call_name == "generate" and session.forwards > 0
        # generate(use_cache=False) runs the whole sequence again at each step: only its tokens past those already
        # recorded are new to the run (the others were recorded when they were first computed)
        seen = session.tokens_seen if fed_back and tokens > session.tokens_seen else 0
        first = session.tokens_seen - seen  # the run's index of this forward's first token
        positions = forwards.positions_for(kwargs, tokens, first, not self._in_call)
        keep = forwards.stored_tokens(self._tokens, session, first, seen, tokens, fed_back)
        forward = self._forward = Forward(batch=batch, tokens=tokens, side=side, keep=keep)
        self.keep_hooks_last()
        for switch in self.entry_switches.values():
            switch.on()
        session.tokens_seen += tokens - seen
        if not forward.stored:
            return
        if session.open_message is not None:
            self.put(session.open_message)
            session.open_message = None
        mask = kwargs.get("attention_mask")
        message = self._token_records.message(session, ids, mask, positions, keep, first)
        forward.tokens_message = message  # sent with the forward's last messages (a side forward's: if it ran)

    def _finish_forward(self) -> None:
        forward, session = self._forward, self._session
        if forward is None or session is None:
            return
        if forward.side and not any(forward.steps.values()):  # an embedding call that started no iteration
            self._forward = None  # (Huginn embeds the prompt once to shape its warm start): nothing to record
            session.tokens_seen -= forward.tokens
            return
        if not forward.stored:  # tokens= left out every token of this forward
            session.forwards += 1
            self._forward = None
            if not self._in_call:
                self.end_session(complete=True)
            return
        if not any(forward.steps.values()):  # the loop's hooks never fired: say so, once (the run stays, empty)
            self._warn_once(forwards.UNHOOKED)
        self.recorder.record_finals(session, forward, self.adapter.loops)  # may wait for a slab: not held back
        with self.writer.together():  # a decoded token: one queue operation and one wake-up of the writer, not three
            self.put(forward.take_tokens())  # made by _begin_forward for every forward that stores tokens
            self.recorder.flush_stages(session, forward)
            self.recorder.flush_signals(session, forward)
            for spec in self.adapter.loops:
                ran = forward.steps.get(spec.name, 0)
                per_row = None
                if forward.row_steps is not None and spec is self.adapter.loops[0]:
                    per_row = np.full(forward.batch, ran, dtype=np.int32)
                    exited = forward.row_steps > 0
                    per_row[exited], problem = forwards.stored_exits(forward.row_steps[exited], ran, self._stride)
                    self._warn_once(problem)
                self.put(messages.Steps(session.run_ids, spec.name, session.offset, forward.stored, ran, per_row))
        session.offset += forward.stored
        session.forwards += 1
        self._forward = None
        if not self._in_call:
            self.end_session(complete=True)

    def end_session(self, complete: bool) -> None:
        """The runs of the current call end (complete or cut short); a session that stored nothing made no runs."""
        if self._session is None:
            return
        if self._forward is not None:  # an interrupted forward: its staged slabs go back unwritten, its tokens count
            if self.closed and not self.gate.this_thread.owns:  # close() from another thread, mid-forward
                self._warn_once(forwards.CUT_SHORT)
            self.transfer.release(self._forward.stages.values())
            if not self._forward.side and (tokens := self._forward.take_tokens()) is not None:
                self.put(tokens)
        session, self._session, self._forward = self._session, None, None
        if session.open_message is not None:  # nothing was stored: no runs, and their numbers are free again
            if self._tokens.named is None:  # token indices past the call's tokens (a named selection is a choice)
                self._warn_once(f"tokens= kept none of a {session.call} call's {session.tokens_seen} tokens: no run")
            if self._next_run == session.run_ids[-1] + 1:
                self._next_run = session.run_ids[0]
            return
        self.put(messages.CloseRuns(session.run_ids, complete=complete, attrs={"forwards": session.forwards}))

    # ---- the loop's modules (hooks on entry, exit and signal modules) ------------------------------------------------
    def entry_hook(self, spec: LoopSpec):
        def hook(module, args, kwargs):
            if self.gate.others and not self.gate.this_thread.owns:  # another thread's unrecorded forward
                return
            forward = self._forward
            if forward is None or self._nested:
                return
            self.entry_switches[spec.name].off()  # s0 is read once per forward, before its first step
            if spec.name in forward.s0_taken or forward.steps.get(spec.name, 0):
                return
            forward.s0_taken.add(spec.name)
            if not forward.stored:
                return
            if spec.s0_parameter:
                value = self.model.get_parameter(spec.s0_parameter).expand(forward.batch, forward.tokens, -1)
            else:
                value = forwards.argument(args, kwargs, spec.entry_arg)
            if not isinstance(value, torch.Tensor):
                return
            if spec.entry_channels is not None:
                value = value[..., : spec.entry_channels]
            self.recorder.record(self._session, forward, spec, 0, value)

        return hook

    def exit_hook(self, spec: LoopSpec):
        gate = self.gate

        def hook(module, args, output):
            if gate.others and not gate.this_thread.owns:  # another thread's unrecorded forward
                return
            forward = self._forward
            if forward is None:  # outside any forward; after close() it is a forward close() cut short (said)
                self.orphan_calls += not self.closed
                return
            if self._nested:
                return
            step = forward.steps.get(spec.name, 0) + 1
            forward.steps[spec.name] = step
            if not forward.stored:
                return
            state = output[spec.output_index] if isinstance(output, (tuple, list)) else output
            if step % self._stride == 0:
                self.recorder.record(self._session, forward, spec, step // self._stride, state)
            elif isinstance(state, torch.Tensor):  # kept in case it is the last step, as a copy: the model may
                forward.final[spec.name] = (step, state.detach().clone())  # change its state in place later

        return hook

    def signal_hook(self, spec: LoopSpec, signal: str):
        def hook(module, args, output):
            if self._forward is None or self._nested or (self.gate.others and not self.gate.this_thread.owns):
                return
            value = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(value, torch.Tensor):
                step = self._forward.steps.get(spec.name, 0)
                self.recorder.add_signal(self._forward, spec, signal, step, value.detach())

        return hook

    def _warn_once(self, problem: str | None) -> None:
        if problem is not None and problem not in self._warned:
            self._warned.add(problem)
            warnings.warn(f"loopscope: {problem}", stacklevel=user_stacklevel())

    # ---- the writer --------------------------------------------------------------------------------------------------
    def put(self, message) -> None:
        """Hand a message to the writer, first surfacing (and acting on) a failure of the writer."""
        self.check_writer()
        self.writer.put(message)

    def check_writer(self) -> None:
        """After a write failure (disk full, ...) stop recording: detach the hooks, close the capture (completed
        runs stay), then raise the clear error. Hooks of the model itself run outside its forward, so this cannot
        rely on the forward wrapper to close."""
        if self.writer.error is not None:
            try:
                self.writer.raise_if_failed()
            except CaptureWriteError as exc:
                self.abort(exc)
                raise
