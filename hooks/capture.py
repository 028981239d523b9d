"""The Capture handle: hooks on the loop, iteration and token bookkeeping, hand-off to the writer.

Labels are the point of the product, so this module owns them:

* a *run* is one batch row of one ``forward()`` call, or of one whole ``generate()`` call (prefill and every
  decoded token in order), or of one call of a method the adapter names (``call_methods``, e.g. Huginn's
  ``forward_with_adaptive_compute``);
* within one forward of the model, the exit module's k-th call is step k of every token that forward computes;
  step 0 is s0, read before the first iteration. Decoding loops that bypass ``forward()`` (Huginn's adaptive
  exit) are grouped by the adapter's ``entry_methods`` instead: each call starts the next group of tokens;
* token ids come from the forward's ``input_ids``; positions from ``cache_position``/``position_ids``;
* ``tokens=`` and ``step_stride=`` choose what is stored (``selection.py``), on the device, before any copy.

Hooks only read tensors (detached, copied into host slabs), so the model's outputs are bit-identical with and
without loopscope.
"""

from __future__ import annotations

import copy
import functools
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..storage import compression as filters, index, run_files, schema
from ..storage.write import writer as w
from ..storage.write.buffers import HostBufferPool, PinnedScratch
from ..errors import CaptureWriteError, LoopscopeError
from . import adaptive, distributed, metadata, selection
from .adapters import LoopAdapter, LoopSpec
from .detect import resolve_adapter
from .user_frames import user_stacklevel

DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOGICAL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32", torch.float64: "float64"}


@dataclass
class _Session:
    """Runs being filled by one forward() or generate() call."""

    call: str
    run_ids: list[int]
    open_message: Any = None  # OpenRuns, sent once a token is stored (a call that stores none leaves no run)
    offset: int = 0  # tokens stored so far
    forwards: int = 0
    tokens_seen: int = 0  # tokens computed so far: the next token's index in the run (and position, if none given)
    chunks: dict[str, tuple[int, int]] = field(default_factory=dict)  # per loop: (tokens, steps) of its chunks


@dataclass
class _Stage:
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

    @property
    def capacity(self) -> int:
        return self.slab.shape[0] * self.slab.shape[3] - (self.step0 - self.base)

    def place(self, step: int) -> tuple[int, int]:
        """(plane, row within the plane) of ``step``."""
        return divmod(step - self.base, self.slab.shape[3])


@dataclass
class _Forward:
    """Bookkeeping for one pass through the model's top-level forward (or one group of tokens computed outside it,
    started by one of the adapter's ``entry_methods``: a *side* forward, which ends when the next one begins)."""

    batch: int
    tokens: int
    steps: dict[str, int] = field(default_factory=dict)
    s0_taken: set[str] = field(default_factory=set)
    stages: dict[str, _Stage] = field(default_factory=dict)
    side: bool = False
    keep: np.ndarray | None = None  # indices of the tokens this forward stores (tokens=...), None = all
    keep_on: dict = field(default_factory=dict)  # the same indices as a tensor per device, for index_select
    final: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)  # off-stride last state per loop
    tokens_message: Any = None  # a side forward's Tokens, sent only once its group has run an iteration
    row_steps: np.ndarray | None = None  # [B] each row's own exit step (Huginn's adaptive exit), 0 = not exited
    signals: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return self.tokens if self.keep is None else len(self.keep)

    def select(self, value: torch.Tensor) -> torch.Tensor:
        """The stored tokens of a [B, T, ...] tensor, selected where it lives (before any copy to the host)."""
        if self.keep is None:
            return value
        index = self.keep_on.get(value.device)
        if index is None:  # to a GPU from pinned memory without waiting (a pageable copy would block the host)
            index = torch.from_numpy(self.keep)
            index = index.pin_memory().to(value.device, non_blocking=True) if value.is_cuda else index
            self.keep_on[value.device] = index
        return value.index_select(1, index)


class Capture:
    """Hooks attached to one model, writing to one file. Close it (or use ``with``) to flush and detach."""

    def __init__(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        *,
        tokenizer=None,
        loop: str | list[str] | LoopAdapter | None = None,
        mode: str = "w-",
        dtype: str = "keep",
        buffer_mb: float = 64,
        compression: str | None = None,
        chunks: tuple[int, int] | None = None,
        locking: bool | str | None = None,
        tokens: str | slice | range | list[int] | tuple[int, ...] = "all",
        step_stride: int = 1,
    ):
        if not isinstance(model, nn.Module):
            raise LoopscopeError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
        if dtype not in DTYPES:
            raise LoopscopeError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        _check_options(buffer_mb, chunks, tokenizer)
        filters.check(compression)  # an unknown filter or a missing plugin fails before any file is made
        self.model = model
        self.path = distributed.rank_path(path)  # under torchrun: one file per rank
        self.tokenizer = tokenizer
        self._tokens = selection.TokenSelection.parse(tokens)  # bad options fail before the probe forwards
        self._stride = selection.check_stride(step_stride)
        self.adapter = resolve_adapter(model, loop)
        selection.check_stride_for(self._stride, self.adapter)
        self._cast = DTYPES[dtype]
        self._chunks = tuple(chunks) if chunks else None
        self._loop_dtypes: dict[str, torch.dtype] = {}  # per run: one stored dtype per loop, the first it recorded
        self._loop_widths: dict[str, int] = {}  # per run: the state size of each loop, from its first state
        options = {
            "mode": mode,
            "dtype": dtype,
            "buffer_mb": buffer_mb,
            "compression": compression,
            "chunks": list(chunks) if chunks else None,
            "tokenizer": type(tokenizer).__name__ if tokenizer is not None else None,
            "tokens": self._tokens.describe(),
            "step_stride": self._stride,
        }
        self._session: _Session | None = None
        self._forward: _Forward | None = None
        self._in_call = 0  # depth of generate()/call_methods calls; the outermost one makes the runs
        self._call_name = "forward"
        self._side_groups = False  # whether entry-method calls start groups of tokens in the current call
        self._warned_stride_exit = False
        self._orphan_calls = 0
        self._in_forward = 0  # depth of the model's forward() calls running now
        self._nested = 0  # depth of model calls made inside its own forward(), which are not recorded
        self._warned_nested = False
        self._handles: list[Any] = []
        self._restore: list = []
        self._steps_hint: dict[str, int] = {}  # steps each loop ran in the previous forward: sizes the next stage
        self._copy_streams: dict[torch.device, Any] = {}
        self._pending_devices: set[torch.device] = set()
        self._closed = False
        self._locking = locking
        index.create_index(
            self.path,
            mode,
            header=metadata.describe(model, self.adapter, options),
            readout=metadata.readout_params(model, self.adapter),
            locking=locking,
        )
        self._next_run = run_files.next_run_index(self.path)
        self.pool = HostBufferPool(int(buffer_mb * (1 << 20)))
        self._scratch = PinnedScratch()  # ids, masks and positions copied off a CUDA device
        self._decode_copy = None
        self.writer = w.CaptureWriter(
            run_files.RunFiles(self.path, locking=locking),
            self.pool,
            compression=compression,
            inner_steps={s.name: s.inner_steps for s in self.adapter.loops if s.inner_steps},
        )
        try:
            self._install()
        except BaseException:
            self._uninstall()
            self.writer.close()
            raise

    # ---- public --------------------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def flush(self) -> None:
        """Wait until everything captured so far is on disk: completed runs are then readable by other processes."""
        if self._closed:
            return
        try:
            self.writer.drain()
        except CaptureWriteError as exc:  # the writer failed: stop recording and close, as a failed call does
            self._abort(exc)
            raise

    def close(self) -> None:
        """Remove every hook, finish open runs, link them into the index file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._uninstall()
        if self._session is not None:
            self._end_session(complete=False)
        self.writer.close()
        self.pool.close()
        stats = self.pool.stats
        try:
            index.finish_index(
                self.path,
                {
                    "buffer_peak_bytes": stats.peak_bytes,
                    "staging_peak_bytes": self.writer.staging.peak,  # partial chunks the writer assembled
                    "backpressure_waits": stats.waits,
                    "backpressure_seconds": stats.wait_seconds,
                    "orphan_loop_calls": self._orphan_calls,
                },
                locking=self._locking,
            )
        except CaptureWriteError:
            if self.writer.error is None:  # else the writer's error (e.g. disk full) is the one to report
                raise
        if self._orphan_calls:
            warnings.warn(
                f"loopscope: {self._orphan_calls} loop call(s) happened outside the model's forward() and were not "
                "recorded (e.g. a custom decoding loop calling sub-modules directly)",
                stacklevel=2,
            )
        self.writer.raise_if_failed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "recording"
        return f"<loopscope.Capture {self.path!r} {state}, loops {[s.exit for s in self.adapter.loops]}>"

    # ---- hook installation ---------------------------------------------------------------------------------------
    def _install(self) -> None:
        model = self.model
        self._handles.append(model.register_forward_pre_hook(self._on_model_enter, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_exit, with_kwargs=True))
        for spec in self.adapter.loops:
            exits = [model.get_submodule(path) for path in spec.exit.split("|")]  # tied copies: a call each is a step
            entry_module = model.get_submodule(spec.entry) if spec.entry else exits[0]
            self._handles.append(entry_module.register_forward_pre_hook(self._entry_hook(spec), with_kwargs=True))
            self._handles += [module.register_forward_hook(self._exit_hook(spec)) for module in exits]
            for signal, path in spec.signals:
                hook = self._signal_hook(spec, signal)
                self._handles.append(model.get_submodule(path).register_forward_hook(hook))
        self._wrap_method("forward", self._forward_call)
        for name in ("generate", *self.adapter.call_methods):
            self._wrap_method(name, functools.partial(self._whole_call, name))
        for name in self.adapter.entry_methods:
            self._wrap_method(name, self._side_entry)

    def _wrap_method(self, name: str, call) -> None:
        """Replace ``model.<name>`` by an instance attribute that routes through ``call(original, ...)``.

        The wrapper keeps ``__wrapped__`` so ``inspect.signature`` (used by transformers to check generate's
        kwargs) still sees the original signature. It reads ``__wrapped__`` at each call, so that when several
        captures wrap one model, the one closed first can unlink itself from the chain (:meth:`_uninstall`).
        """
        original = getattr(self.model, name, None)
        if not callable(original):
            return

        def wrapper(*args, **kwargs):
            return call(wrapper.__wrapped__, *args, **kwargs)

        wrapper.__wrapped__ = original
        wrapper._loopscope_had_instance_attr = name in vars(self.model)  # what to put back: an attribute, or none
        setattr(self.model, name, wrapper)
        self._restore.append((name, wrapper))

    def _uninstall(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, wrapper in reversed(self._restore):
            top = vars(self.model).get(name)
            if top is wrapper:
                if wrapper._loopscope_had_instance_attr:
                    setattr(self.model, name, wrapper.__wrapped__)
                else:
                    vars(self.model).pop(name, None)
                continue
            # Wrapped again after us. By a later capture: unlink ours from the chain, the later one inheriting
            # what ours wraps. By anything else: ours stays, and passes calls straight through (we are closed).
            above = top
            while hasattr(above, "_loopscope_had_instance_attr") and above.__wrapped__ is not wrapper:
                above = above.__wrapped__
            if hasattr(above, "_loopscope_had_instance_attr"):
                above.__wrapped__ = wrapper.__wrapped__
                above._loopscope_had_instance_attr = wrapper._loopscope_had_instance_attr
        self._restore.clear()

    # ---- calls -------------------------------------------------------------------------------------------------------
    def _forward_call(self, original, *args, **kwargs):
        self._in_forward += 1
        try:
            return original(*args, **kwargs)
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            self._in_forward -= 1

    def _whole_call(self, name: str, original, *args, **kwargs):
        """generate() (or an adapter's call method): everything it computes is one run per batch row."""
        if self._in_call or self._closed or self._in_forward:  # a generate() calling generate() (a dispatcher) is
            return original(*args, **kwargs)  # one call; one run inside the model's forward is not recorded
        beams = _num_beams(self.model, args, kwargs) if name == "generate" else 1
        if beams > 1:
            raise LoopscopeError(
                f"generate(num_beams={beams}): beam search reorders the batch rows at every step, so no row is one "
                "sequence to record as a run; use num_beams=1 (greedy or sampling), or close the capture first"
            )
        self._in_call += 1
        self._call_name = name
        # Only decoding loops the adapter describes group tokens by entry-method calls (Huginn: adaptive exit);
        # others that bypass forward() (Huginn's diffusion-style sampler) leave their loop calls unrecorded.
        self._side_groups = name in self.adapter.call_methods or any(
            k in kwargs for k in self.adapter.exit_evaluator_kwargs
        )
        try:
            args, kwargs = self._watch_exits(args, kwargs)
            result = original(*args, **kwargs)
        except BaseException as exc:
            self._in_call -= 1
            self._abort(exc)
            raise
        self._in_call -= 1
        self._side_groups = False
        if self._forward is not None and self._forward.side:
            self._finish_forward()
        if self._session is not None:
            self._end_session(complete=True)
        return result

    def _side_entry(self, original, *args, **kwargs):
        """An entry method (Huginn's ``embed_inputs``): inside forward() nothing happens; inside generate() a call
        begins a new group of tokens, whose iterations are the loop calls until the next group begins."""
        if self._closed or (self._forward is not None and not self._forward.side) or not self._side_groups:
            return original(*args, **kwargs)  # loop calls outside any call stay orphans (counted, not recorded)
        try:
            if self._forward is not None:
                self._finish_forward()
            self._begin_forward(args, kwargs, side=True)
            return original(*args, **kwargs)
        except BaseException as exc:
            self._abort(exc)
            raise

    def _watch_exits(self, args, kwargs):
        """Put a watcher around Huginn's exit evaluator so each row's own exit step is known (see adaptive.py)."""
        if not self.adapter.exit_evaluator_kwargs:
            return args, kwargs
        if len(args) > 1 and adaptive.is_evaluator(args[1]):  # forward_with_adaptive_compute(ids, evaluator)
            return (args[0], adaptive.ExitWatcher(args[1], self._on_exit_check), *args[2:]), kwargs
        if not any(k in kwargs for k in self.adapter.exit_evaluator_kwargs):
            return args, kwargs
        evaluator = adaptive.evaluator_for(self.model, kwargs)
        if evaluator is None:
            return args, kwargs
        return args, {**kwargs, "exit_evaluator": adaptive.ExitWatcher(evaluator, self._on_exit_check)}

    def _on_exit_check(self, exits: torch.Tensor, values: torch.Tensor) -> None:
        forward = self._forward
        if forward is None or self._closed:
            return
        spec = self.adapter.loops[0]
        step = forward.steps.get(spec.name, 0)
        exits = exits.detach().reshape(-1).to("cpu")
        if exits.numel() == forward.batch:
            if forward.row_steps is None:
                forward.row_steps = np.zeros(forward.batch, dtype=np.int32)
            newly = exits.numpy().astype(bool) & (forward.row_steps == 0)
            forward.row_steps[newly] = step
        values = values.detach().float()
        if values.numel() == forward.batch:  # one value per row, computed on the last position
            per_token = torch.full((forward.batch, forward.tokens), float("nan"), device=values.device)
            per_token[:, -1] = values.reshape(-1)
            values = per_token
        self._add_signal(spec, "exit_value", step, values)

    def _abort(self, exc: BaseException) -> None:
        """An exception inside a captured call (the model's, or a write failure): stop recording, keep completed
        runs, mark the interrupted ones incomplete, close the file. The caller re-raises ``exc`` unchanged."""
        if self._closed:
            return
        try:
            self.close()
        except Exception as secondary:  # e.g. the writer's own error; the original exception is the one to see
            if str(secondary) != str(exc) and hasattr(exc, "add_note"):
                exc.add_note(f"loopscope: while closing the capture: {secondary}")
        # said at once: a caller that catches the exception and goes on would otherwise record nothing, unaware
        warnings.warn(
            f"loopscope: {type(exc).__name__} in a captured call closed the capture {self.path} (its completed runs "
            "are kept); attach again with mode='a' to record more",
            RuntimeWarning,
            stacklevel=user_stacklevel(),
        )

    def _on_model_enter(self, module, args, kwargs):
        if self._in_forward:  # the model called inside its own forward (from a hook, say): not recorded, and the
            self._nested += 1  # outer forward goes on as if it had not happened
            if self._nested == 1 and not self._warned_nested:
                warnings.warn("loopscope: a call of the model inside its own forward() is not recorded",
                              stacklevel=user_stacklevel())
                self._warned_nested = True
            return
        if self._forward is not None and self._forward.side:  # a group computed outside forward() ends here
            self._finish_forward()
        elif self._forward is not None:  # the previous forward raised before finishing: its runs are incomplete
            if self._session is not None:
                self._end_session(complete=False)  # also gives the interrupted forward's staged slabs back
            self._forward = None
        self._begin_forward(args, kwargs)

    def _begin_forward(self, args, kwargs, side: bool = False) -> None:
        self._check_writer()
        input_ids, embeds = _find_inputs(args, kwargs)
        if input_ids is not None:
            ids = input_ids.detach()
            if ids.dim() == 1:
                ids = ids.unsqueeze(0)
        elif embeds is not None:
            ids = torch.full(embeds.shape[:2], -1, dtype=torch.int64)
        else:
            raise LoopscopeError(
                "loopscope could not find the inputs of the model's forward call: pass input_ids (or inputs_embeds), "
                "or token ids as an integer tensor [batch, tokens]"
            )
        batch, tokens = ids.shape
        if self._session is None:
            call = self._call_name if self._in_call else "forward"
            run_ids = list(range(self._next_run, self._next_run + batch))
            self._next_run += batch
            attrs = {"call": call, "batch_size": batch, "loops": [s.name for s in self.adapter.loops],
                     "step_stride": self._stride}
            opening = w.OpenRuns(run_ids, [{**attrs, "batch_row": b} for b in range(batch)])
            self._session = _Session(call=call, run_ids=run_ids, open_message=opening)
            self._loop_dtypes.clear()  # each run file holds one dtype per loop; a new run may have another
            self._loop_widths.clear()
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
        positions = _positions_for(kwargs, batch, tokens, session.tokens_seen - seen)
        indices = np.arange(session.tokens_seen - seen, session.tokens_seen - seen + tokens)  # the run's k-th tokens
        keep = self._tokens.keep(fed_back, indices[seen:])
        if seen:
            keep = np.arange(seen, tokens) if keep is None else keep + seen
        forward = self._forward = _Forward(batch=batch, tokens=tokens, side=side, keep=keep)
        session.tokens_seen += tokens - seen
        if not forward.stored:
            return
        if session.open_message is not None:
            self._put(session.open_message)
            session.open_message = None
        mask = _mask_for(kwargs.get("attention_mask"), batch, tokens)
        host_ids = self._to_host(ids, torch.int64)
        strings = decode = None
        if self.tokenizer is not None and ids.is_cuda:  # the ids are still on their way: text on the writer's thread
            decode = self._writer_decode()
        elif self.tokenizer is not None:
            strings = w.token_texts(host_ids if keep is None else host_ids[:, keep], self.tokenizer.decode)
        message = w.Tokens(
            session.run_ids,
            session.offset,
            host_ids,
            self._to_host(mask, torch.int8),
            self._to_host(positions, torch.int64),
            session.forwards,
            strings=strings,
            keep=keep,  # applied on the writer's thread
            decode=decode,
            ready=self._ready_event(),
            scratch=self._scratch,
        )
        if side:
            forward.tokens_message = message
        else:
            self._put(message)

    def _on_model_exit(self, module, args, kwargs, output):
        if self._nested:
            self._nested -= 1
            return
        if self._forward is not None and not self._forward.side:
            try:  # a forward hook runs after forward() returned, outside the wrapper that aborts on errors
                self._finish_forward()
            except BaseException as exc:
                self._abort(exc)
                raise

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
                self._end_session(complete=True)
            return
        if forward.tokens_message is not None:
            self._put(forward.tokens_message)
        self._record_finals()
        self._flush_stages()
        self._flush_signals()
        for spec in self.adapter.loops:
            steps = np.full((forward.batch, forward.stored), forward.steps.get(spec.name, 0), dtype=np.int32)
            if forward.row_steps is not None and spec is self.adapter.loops[0]:
                exited = forward.row_steps > 0
                steps[exited] = self._stored_exit(forward.row_steps[exited], forward.steps.get(spec.name, 0))[:, None]
            self._put(w.Steps(session.run_ids, spec.name, session.offset, steps))
        session.offset += forward.stored
        session.forwards += 1
        self._forward = None
        if not self._in_call:
            self._end_session(complete=True)

    def _end_session(self, complete: bool) -> None:
        if self._forward is not None:  # an interrupted forward: its staged slabs go back unwritten, once no copy
            for stream in self._copy_streams.values():  # into them is still running
                stream.synchronize()
            for stage in self._forward.stages.values():
                self.pool.release(stage.slab)
        session, self._session, self._forward = self._session, None, None
        if session.open_message is not None:  # nothing was stored: no runs, and their numbers are free again
            if self._next_run == session.run_ids[-1] + 1:
                self._next_run = session.run_ids[0]
            return
        self._put(w.CloseRuns(session.run_ids, complete=complete, attrs={"forwards": session.forwards}))

    def _entry_hook(self, spec: LoopSpec):
        def hook(module, args, kwargs):
            forward = self._forward
            if forward is None or self._nested or spec.name in forward.s0_taken or forward.steps.get(spec.name, 0):
                return
            forward.s0_taken.add(spec.name)
            if not forward.stored:
                return
            if spec.s0_parameter:
                value = self.model.get_parameter(spec.s0_parameter).expand(forward.batch, forward.tokens, -1)
            else:
                value = _argument(args, kwargs, spec.entry_arg)
            if not isinstance(value, torch.Tensor):
                return
            if spec.entry_channels is not None:
                value = value[..., : spec.entry_channels]
            self._record(spec, 0, value)

        return hook

    def _exit_hook(self, spec: LoopSpec):
        def hook(module, args, output):
            forward = self._forward
            if forward is None:
                self._orphan_calls += 1
                return
            if self._nested:
                return
            step = forward.steps.get(spec.name, 0) + 1
            forward.steps[spec.name] = step
            if not forward.stored:
                return
            state = output[spec.output_index] if isinstance(output, (tuple, list)) else output
            if step % self._stride == 0:
                self._record(spec, step // self._stride, state)
            elif isinstance(state, torch.Tensor):  # kept in case it is the last step, as a copy: the model may
                forward.final[spec.name] = (step, state.detach().clone())  # change its state in place later

        return hook

    def _stored_exit(self, exits: np.ndarray, last: int) -> np.ndarray:
        """Rows of an adaptive batch that exited between stored steps (with ``step_stride``) are recorded up to
        their last stored iteration: only the batch's own last iteration is kept off the stride."""
        off = (exits % self._stride != 0) & (exits != last)
        if off.any():
            if not self._warned_stride_exit:
                warnings.warn(
                    f"loopscope: with step_stride={self._stride}, rows of an adaptive batch that exit between stored "
                    "steps are recorded up to their last stored iteration; use batch size 1 or step_stride=1 to "
                    "keep each row's exit state",
                    stacklevel=4,
                )
                self._warned_stride_exit = True
            exits = np.where(off, exits - exits % self._stride, exits)
        return exits

    def _record_finals(self) -> None:
        """With ``step_stride``: a token's last iteration is always stored, one slot after the last on-stride one,
        so s* (the final state) is never lost. ``selection.iteration_of`` maps slots back to iterations."""
        forward = self._forward
        for spec in self.adapter.loops:
            held = forward.final.get(spec.name)
            if held is None or held[0] != forward.steps.get(spec.name, 0):
                continue
            step, state = held
            self._record(spec, step // self._stride + 1, state)
        forward.final.clear()

    def _signal_hook(self, spec: LoopSpec, signal: str):
        def hook(module, args, output):
            if self._forward is None or self._nested:
                return
            value = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(value, torch.Tensor):
                self._add_signal(spec, signal, self._forward.steps.get(spec.name, 0), value.detach())

        return hook

    def _add_signal(self, spec: LoopSpec, signal: str, step: int, value: torch.Tensor) -> None:
        """Keep a per-token scalar for this forward; they go to the writer together when the forward ends."""
        forward = self._forward
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

    def _flush_signals(self) -> None:
        """One message per signal and forward: its values at the steps it was seen at, in one host copy (off a CUDA
        device without waiting); the writer lays them out over consecutive steps."""
        forward, session = self._forward, self._session
        for (loop, signal), entries in forward.signals.items():
            ran = forward.steps.get(loop, 0)
            slotted = [(selection.slot_of(step, ran, self._stride), v) for step, v in entries]
            kept = [(slot, v) for slot, v in slotted if slot is not None]  # off-stride steps are not stored
            if not kept:
                continue
            slots = np.asarray([slot for slot, _ in kept])
            first = int(slots.min())
            values = self._to_host(torch.stack([v for _, v in kept], dim=-1), torch.float32)  # no wait on CUDA
            self._put(w.Signal(session.run_ids, loop, signal, session.offset, first, values, slots=slots - first,
                               ready=self._ready_event(), scratch=self._scratch))
        forward.signals.clear()

    # ---- the copy ------------------------------------------------------------------------------------------------
    def _record(self, spec: LoopSpec, step: int, state: torch.Tensor) -> None:
        forward = self._forward
        state = state.detach()
        if state.dim() == 2 and forward.batch == 1:
            state = state.unsqueeze(0)
        if state.dim() != 3 or tuple(state.shape[:2]) != (forward.batch, forward.tokens):
            raise LoopscopeError(
                f"loop {spec.exit!r} produced a state of shape {tuple(state.shape)}, expected "
                f"({forward.batch}, {forward.tokens}, hidden); pass loop= with the module that outputs the state"
            )
        width = self._loop_widths.setdefault(spec.name, state.shape[2])
        if state.shape[2] != width:  # s0 and the iterations must be one state, of one size
            raise LoopscopeError(
                f"loop {spec.exit!r} produced states {state.shape[2]} wide after {width}-wide ones (s0 included); "
                "pass loop= with the module whose output is the loop's state"
            )
        state = forward.select(state)
        if self._cast is not None and state.dtype != self._cast:
            state = state.to(self._cast)
        state = self._one_dtype(spec, state)
        logical = LOGICAL_DTYPES.get(state.dtype)
        if logical is None:
            raise LoopscopeError(f"loop {spec.exit!r} produced {state.dtype} states; only floating point is recorded")
        chunk_tokens, depth = self._chunk_shape(spec, state)
        stage = forward.stages.get(spec.name)
        # a stage holds consecutive steps from one kind of device: a CPU s0 before CUDA iterations (an offloaded
        # embedding) goes in a stage of its own, and the iterations in a pinned one
        if stage is not None and (stage.filled == stage.capacity or step != stage.step0 + stage.filled
                                  or state.is_cuda != stage.cuda):
            self._send_stage(spec.name, stage)
            stage = None
        if stage is None:
            plane = state.numel() * state.element_size() * depth
            room = self.pool.max_slab_bytes(state.is_cuda)
            if plane > room:
                self._record_split(spec, step, state, logical, chunk_tokens)
                return
            # As many planes as the last forward of this loop ran steps (all of them, for decoding), within the
            # slab limit: one message and one HDF5 write per chunk for the whole group instead of one per step.
            base = step - step % depth
            expected = self._steps_hint.get(spec.name, 8) + 1  # slots of the forward, s0 included
            planes = max(1, min(-(-(expected - base) // depth), room // plane))
            shape = (planes, forward.batch, forward.stored, depth, state.shape[2])
            slab = self.pool.acquire(shape, state.dtype, state.is_cuda)
            stage = forward.stages[spec.name] = _Stage(slab, base, step, logical, cuda=state.is_cuda)
        self._copy_step(stage, step, state)
        stage.filled += 1

    def _chunk_shape(self, spec: LoopSpec, state: torch.Tensor) -> tuple[int, int]:
        """(tokens, steps) per chunk of this loop's states in the current runs, fixed at its first state: the
        ``chunks=`` option, else sized from the data (see ``schema.state_chunks``) so that one chunk depth of this
        forward's tokens fits one slab."""
        session = self._session
        chunks = session.chunks.get(spec.name)
        if chunks is None:
            if self._chunks is not None:
                chunks = self._chunks
            else:
                hint = self._steps_hint.get(spec.name)
                slots = hint + 1 if hint else None
                step_bytes = state.numel() * state.element_size()
                chunk_tokens, depth, _ = schema.state_chunks(
                    state.shape[2], state.element_size(), slots, state.shape[1],
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

    def _record_split(self, spec: LoopSpec, step: int, state: torch.Tensor, logical: str, chunk_tokens: int) -> None:
        """A chunk depth of this forward's tokens is larger than a slab (a long prefill): send each step at once,
        in blocks of whole chunks' tokens where a block holds any."""
        session = self._session
        batch, tokens, hidden = state.shape
        block = max(self.pool.max_slab_bytes(state.is_cuda) // (batch * hidden * state.element_size()), 1)
        if block > chunk_tokens:
            block -= block % chunk_tokens
        for t0 in range(0, tokens, block):
            t1 = min(t0 + block, tokens)
            slab = self.pool.acquire((1, batch, t1 - t0, 1, hidden), state.dtype, state.is_cuda)
            piece = state[:, t0:t1]
            # on CUDA a copy taken on the model's stream goes down, not the state, which the model may change later
            self._copy(slab[0, :, :, 0], piece.clone() if piece.is_cuda else piece)
            self._put(w.State(session.run_ids, spec.name, session.offset + t0, step, slab, 1, logical,
                              self._ready_event(), chunks=session.chunks[spec.name]))

    def _send_stage(self, loop: str, stage: "_Stage", last: bool = False) -> None:
        session, forward = self._session, self._forward
        self._copy_plane_down(stage)
        self._put(
            w.State(session.run_ids, loop, session.offset, stage.step0, stage.slab, stage.filled, stage.logical,
                    self._ready_event(), base=stage.base, chunks=session.chunks[loop], last=last)
        )
        forward.stages.pop(loop, None)

    def _flush_stages(self) -> None:
        forward = self._forward
        for loop, stage in list(forward.stages.items()):
            self._send_stage(loop, stage, last=True)
        for name, steps in forward.steps.items():  # slots this loop filled: s0 excluded, as the hint expects
            self._steps_hint[name] = -(-steps // self._stride)

    def _copy_step(self, stage: _Stage, step: int, state: torch.Tensor) -> None:
        """Put one step's state [B, T, H] in its row of the stage. On the CPU, one copy straight into the slab. On
        CUDA the rows of a plane are gathered on the device first, and the plane goes down in one contiguous copy
        on the side stream when it is full or the stage is sent: a row of a plane is strided in host memory, and a
        strided device-to-host copy would go through a pageable temporary and block until it is done. The gather
        runs on the model's own stream, so it reads the state before anything the model queues later can change it
        in place (a side-stream read could run after such a write)."""
        plane, row = stage.place(step)
        if not state.is_cuda:
            stage.slab[plane, :, :, row].copy_(state)  # ``state`` is detached: no autograd record, no grad mode
            return
        if stage.device_plane is not None and stage.device_plane != plane:
            self._copy_plane_down(stage)
        if stage.on_device is None:  # a plane of its own: the one before may still be on its way down
            stage.on_device = torch.empty(stage.slab.shape[1:], dtype=state.dtype, device=state.device)
        stage.on_device[:, :, row].copy_(state)  # the model's stream; ``state`` is detached
        stage.device_plane = plane
        if row == stage.slab.shape[3] - 1:
            self._copy_plane_down(stage)

    def _copy_plane_down(self, stage: _Stage) -> None:
        """CUDA: the plane gathered on the device goes to its place in the pinned slab, on the side stream; the
        allocator keeps the plane's device memory until that copy is done (``_copy`` records the stream)."""
        if stage.device_plane is None:
            return
        self._copy(stage.slab[stage.device_plane], stage.on_device)
        stage.device_plane = None
        stage.on_device = None

    def _copy(self, destination: torch.Tensor, state: torch.Tensor) -> None:
        """Copy into a contiguous block of a host slab. From CUDA: on a side stream, into pinned memory, without
        blocking the model's stream; the writer waits on an event recorded after the copies (``_ready_event``).
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

    def _ready_event(self):
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

    def _put(self, message) -> None:
        """Hand a message to the writer, first surfacing (and acting on) a failure of the writer."""
        self._check_writer()
        self.writer.put(message)

    def _check_writer(self) -> None:
        """After a write failure (disk full, ...) stop recording: detach the hooks, close the capture (completed
        runs stay), then raise the clear error. Hooks of the model itself run outside its forward, so this cannot
        rely on the forward wrapper to close."""
        if self.writer.error is not None:
            try:
                self.writer.raise_if_failed()
            except CaptureWriteError as exc:
                self._abort(exc)
                raise

    def _writer_decode(self):
        """The tokenizer's ``decode`` for the writer's thread, on a private copy: a fast tokenizer that the model's
        thread is using at the same time (a streamer, a call with padding) can refuse a second thread."""
        if self._decode_copy is None:
            try:
                self._decode_copy = copy.deepcopy(self.tokenizer).decode
            except Exception:  # a tokenizer that cannot be copied: share it
                self._decode_copy = self.tokenizer.decode
        return self._decode_copy

    def _to_host(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A host copy of a forward's small per-token tensor (ids, mask, positions, a signal's values), which the
        model may reuse once the forward returns. Off a CUDA device the copy is taken on the model's stream, so
        nothing queued later can change it, and goes down into a reused pinned tensor on the side stream without
        waiting: no host synchronisation per forward (the writer waits on the message's events before reading)."""
        if isinstance(value, np.ndarray):  # made here (no mask given, positions counted)
            return value
        value = value.detach().to(dtype=dtype, copy=True)
        if not value.is_cuda:
            return value
        host = self._scratch.take(tuple(value.shape), dtype)
        self._copy(host, value)
        return host


def attach(model: nn.Module, path: str | os.PathLike, **options) -> Capture:
    """Record every iteration of ``model``'s loop into the HDF5 file ``path``; returns the :class:`Capture`.

    Options: ``tokenizer`` (stores token strings), ``loop`` (dotted module path(s) overriding detection),
    ``mode`` ("w-" refuses an existing file, "w" overwrites, "a" appends runs), ``dtype`` ("keep", "float32",
    "float16", "bfloat16"), ``buffer_mb`` (host staging budget), ``compression`` (None, "gzip", "lzf", or with
    ``loopscope[compress]`` "lz4", "zstd", "blosc-lz4", "bitshuffle-lz4"), ``chunks`` ((tokens, steps) per
    chunk), ``locking`` (h5py file locking).

    Byte reduction, applied on the model's device before any copy: ``tokens`` ("all", "prompt", "generated", or
    positions as a slice / range / list) and ``step_stride`` (store s0, every n-th iteration and each token's last
    one; ``Run.step_iterations()`` maps stored steps back to iterations).
    """
    unknown = set(options) - {
        "tokenizer", "loop", "mode", "dtype", "buffer_mb", "compression", "chunks", "locking", "tokens", "step_stride"
    }
    if unknown:
        raise LoopscopeError(f"attach() got unknown option(s) {sorted(unknown)}")
    return Capture(model, path, **options)


def _find_inputs(args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(token ids, input embeddings) of a forward call, either None. ``input_ids=`` / ``inputs_embeds=`` first;
    else integer ids as the first argument ([T] or [B, T]), or the first integer [B, T] tensor passed by another
    name (nanoGPT's ``model(idx=...)``) that is no mask, position or type id; else the first floating tensor
    [batch, tokens, features] (a looped model over features), whose tokens get id -1."""
    ids = kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
    if isinstance(ids, torch.Tensor) or isinstance(embeds, torch.Tensor):
        return (ids if isinstance(ids, torch.Tensor) else None), (embeds if isinstance(embeds, torch.Tensor) else None)

    def integer(t) -> bool:
        return isinstance(t, torch.Tensor) and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)

    if args and integer(args[0]) and args[0].dim() in (1, 2):
        return args[0], None
    named = [value for key, value in kwargs.items() if not key.endswith(("mask", "position_ids", "type_ids", "labels"))
             and key != "cache_position"]
    tensors = [t for t in (*args[1:], *named) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if integer(t) and t.dim() == 2:
            return t, None
    for t in (*args[:1], *tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3:
            return None, t
    return None, None


def _check_options(buffer_mb, chunks, tokenizer) -> None:
    """The options whose mistakes would otherwise surface mid-forward, from torch, h5py or the tokenizer."""
    if isinstance(buffer_mb, bool) or not isinstance(buffer_mb, (int, float)) or not 0 < buffer_mb < float("inf"):
        raise LoopscopeError(f"buffer_mb={buffer_mb!r} must be a positive number of MiB, e.g. 64")
    if chunks is not None:
        parts = tuple(chunks) if isinstance(chunks, (tuple, list)) else ()
        if len(parts) != 2 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n > 0
                                      for n in parts):
            raise LoopscopeError(f"chunks={chunks!r} must be (tokens, steps): two positive integers, e.g. (64, 4)")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise LoopscopeError(
            f"tokenizer= needs a decode() method (a transformers tokenizer); {type(tokenizer).__name__} has none"
        )


def _num_beams(model: nn.Module, args, kwargs) -> int:
    """The beam count a generate() call will use: its num_beams=, else its generation config's, else the model's."""
    if kwargs.get("num_beams") is not None:
        return int(kwargs["num_beams"])
    config = kwargs.get("generation_config")
    if config is None:  # generate(inputs, generation_config, ...) positionally
        config = next((a for a in args[1:2] if hasattr(a, "num_beams")), getattr(model, "generation_config", None))
    return int(getattr(config, "num_beams", None) or 1)


def _argument(args, kwargs, where: int | str):
    if isinstance(where, str):
        return kwargs.get(where)
    if len(args) > where:
        return args[where]
    return kwargs.get("hidden_states", next(iter(kwargs.values()), None) if kwargs else None)


def _mask_for(mask, batch: int, tokens: int) -> torch.Tensor | np.ndarray:
    """The forward's [B, T] attention mask where it has one (left where it lives), else ones."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= tokens:
        return mask[:, -tokens:]
    return np.ones((batch, tokens), dtype=np.int8)


def _positions_for(kwargs, batch: int, tokens: int, offset: int) -> torch.Tensor | np.ndarray:
    """The forward's [B, T] positions: ``position_ids``, else ``cache_position``, else counted from ``offset``."""
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == tokens:
        pos = position_ids.reshape(-1, tokens)
        return pos.expand(batch, tokens) if pos.shape[0] == 1 else pos
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() == tokens:
        return cache_position.reshape(1, tokens).expand(batch, tokens)
    return np.broadcast_to(np.arange(offset, offset + tokens, dtype=np.int64), (batch, tokens))
