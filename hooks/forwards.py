"""What the tracker knows about one call of the model: the runs it fills (:class:`Session`), one pass through the
model's forward (:class:`Forward`), where a forward's inputs are (ids, mask, positions), what the writer gets of
its tokens (:class:`TokenRecords`), the generate() calls it cannot follow (beam search, assisted decoding), and how
an adaptive-exit evaluator's answers are read."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LoopscopeError
from ..storage.write import messages
from .call_arguments import call_arguments
from .transfer import DeviceTransfer, Stage
from .user_frames import user_stacklevel


@dataclass
class CallInputs:
    """What a whole call (generate(), an adapter's call method such as Huginn's decoders) was given, read once per
    call, not per forward: its prompt's length (tokens past it were generated), its [B, T] attention mask, which
    stands for the mask of forwards given only other forms of it (a static cache's 4-D masks), and its settings. A
    cache passed in already holding the prompt's first tokens (a chat's earlier turns) is not computed again: the
    run starts after them."""

    prompt: int | None = None  # the run's tokens from this index on were generated (None: not known)
    mask: torch.Tensor | None = None
    cached: int = 0  # the prompt's tokens the cache passed in already held: the run's token 0 is the call's this
    arguments: str = "{}"  # the call's settings as JSON (``call_arguments.py``), stored with each of its runs

    @classmethod
    def of(cls, args, kwargs) -> CallInputs:
        ids, embeds = find_inputs(args, kwargs)
        prompt = ids.shape[-1] if ids is not None else None if embeds is None else embeds.shape[1]
        mask = kwargs.get("attention_mask")
        rows = None if ids is None else (1 if ids.dim() == 1 else ids.shape[0])
        if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == rows):
            mask = None
        cached = cached_length(kwargs.get("past_key_values"))
        arguments = call_arguments(kwargs)
        if cached is None:  # a cache whose length cannot be read: where the run starts in the prompt is unknown
            return cls(None, None, arguments=arguments)
        return cls(None if prompt is None else max(prompt - cached, 0), mask, cached, arguments)

    def mask_of(self, first: int, tokens: int) -> torch.Tensor | None:
        """The call's mask for the run's tokens ``first`` to ``first + tokens``: each decoded token attended (1)."""
        if self.mask is None:
            return None
        rows = self.mask.shape[0]
        first += self.cached
        given = self.mask[:, first : first + tokens]
        more = tokens - given.shape[1]
        return given if not more else torch.cat([given, given.new_ones(rows, more)], dim=1)


def cached_length(cache) -> int | None:
    """Tokens a cache given to a call already holds: 0 for none, None where its length cannot be read."""
    if cache is None:
        return 0
    try:
        if hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
        if isinstance(cache, (tuple, list)):  # the legacy form: per layer (key [B, heads, T, d], value)
            return int(cache[0][0].shape[-2]) if len(cache) else 0
    except (TypeError, ValueError, IndexError, AttributeError, RuntimeError):
        pass
    return None


@dataclass
class Session:
    """Runs being filled by one forward() or generate() call."""

    call: str
    run_ids: list[int]
    open_message: Any = None  # OpenRuns, sent once a token is stored (a call that stores none leaves no run)
    inputs: CallInputs | None = None  # of the whole call (generate(), a call method); None for a forward() run
    offset: int = 0  # tokens stored so far
    forwards: int = 0
    tokens_seen: int = 0  # tokens computed so far: the next token's index in the run (and position, if none given)
    chunks: dict[str, tuple[int, int]] = field(default_factory=dict)  # per loop: (tokens, steps) of its chunks


@dataclass
class Forward:
    """Bookkeeping for one pass through the model's top-level forward (or one group of tokens computed outside it,
    started by one of the adapter's ``entry_methods``: a *side* forward, which ends when the next one begins)."""

    batch: int
    tokens: int
    steps: dict[str, int] = field(default_factory=dict)
    s0_taken: set[str] = field(default_factory=set)
    stages: dict[str, Stage] = field(default_factory=dict)
    side: bool = False
    keep: np.ndarray | None = None  # indices of the tokens this forward stores (tokens=...), None = all
    keep_on: dict = field(default_factory=dict)  # the same indices as a tensor per device, for index_select
    final: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)  # off-stride last state per loop
    # The forward's Tokens, sent with its closing messages (a side forward's only once its group ran an iteration)
    tokens_message: Any = None
    row_steps: np.ndarray | None = None  # [B] each row's own exit step (Huginn's adaptive exit), 0 = not exited
    signals: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = field(default_factory=dict)
    stored: int = field(init=False)  # how many of its tokens are stored (read at every step: a plain int)

    def __post_init__(self) -> None:
        self.stored = self.tokens if self.keep is None else len(self.keep)

    def take_tokens(self) -> Any:
        """The forward's Tokens message, once (then None: an interrupted forward's is not sent twice)."""
        message, self.tokens_message = self.tokens_message, None
        return message

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


def stored_tokens(selection, session: Session, first: int, seen: int, tokens: int, fed_back: bool) -> np.ndarray | None:
    """Indices of the forward's tokens to store (None: all): the run's tokens ``first + seen`` to ``first + tokens``
    (``seen``: those recomputed, never stored again). Past the call's prompt a token was generated; where the
    prompt's length is not known, a generate() call's forwards after its first are."""
    keep = None
    if not selection.everything:
        indices = np.arange(first + seen, first + tokens)
        prompt = session.inputs.prompt if session.inputs is not None else None
        if prompt is None:
            prompt = first + seen if fed_back else first + tokens
        keep = selection.keep(prompt, indices)
    if seen:
        keep = np.arange(seen, tokens) if keep is None else keep + seen
    return keep


def find_inputs(args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
    named = [
        value
        for key, value in kwargs.items()
        if not key.endswith(("mask", "position_ids", "type_ids", "labels")) and key != "cache_position"
    ]
    tensors = [t for t in (*args[1:], *named) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if integer(t) and t.dim() == 2:
            return t, None
    for t in (*args[:1], *tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == 3:
            return None, t
    return None, None


def token_ids(args, kwargs) -> torch.Tensor:
    """The forward's token ids [B, T] (-1 for input embeddings), or the one-line error that it has none."""
    input_ids, embeds = find_inputs(args, kwargs)
    if input_ids is not None:
        ids = input_ids.detach() if input_ids.requires_grad else input_ids
        return ids.unsqueeze(0) if ids.dim() == 1 else ids
    if embeds is not None:
        return torch.full(embeds.shape[:2], -1, dtype=torch.int64)
    raise LoopscopeError(
        "loopscope could not find the inputs of the model's forward call: pass input_ids (or inputs_embeds), "
        "or token ids as an integer tensor [batch, tokens]"
    )


def generate_setting(model: nn.Module, args, kwargs, name: str):
    """A generate() call's setting ``name``: its keyword, else its generation config's, else the model's."""
    if kwargs.get(name) is not None:
        return kwargs[name]
    config = kwargs.get("generation_config")
    if config is None:  # generate(inputs, generation_config, ...) positionally
        config = next((a for a in args[1:2] if hasattr(a, "num_beams")), getattr(model, "generation_config", None))
    return getattr(config, name, None)


def num_beams(model: nn.Module, args, kwargs) -> int:
    """The beam count a generate() call will use: its num_beams=, else its generation config's, else the model's."""
    return int(generate_setting(model, args, kwargs, "num_beams") or 1)


#: Said once when a forward stores tokens but no call of its loop reached the hooks (its run holds no iterations).
UNHOOKED = (
    "a forward of the model recorded no iteration of its loop, so its run holds none. If you did not ask for 0 "
    "iterations: a torch.compile'd model does this when it reuses graphs compiled without hooks (an earlier "
    "compile of the same class), so set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling, "
    "or call torch._dynamo.reset() before attach(); else check that loop= names the module each iteration calls"
)

#: Said when close() ends a session while a forward runs (called from another thread than the forward's).
CUT_SHORT = (
    "close() ended a forward that was still running (in another thread): its run(s) are left incomplete "
    "(.partial.h5, which readers skip); close the capture after the model's call returns to keep them"
)

#: generate() settings that switch on assisted (speculative) decoding in transformers.
ASSISTED_DECODING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def refuse_unfollowable_generate(model: nn.Module, args, kwargs) -> None:
    """One line for a generate() call whose forwards are not one sequence per batch row: beam search, assisted
    decoding (it runs the model on draft tokens and throws the rejected ones away)."""
    beams = num_beams(model, args, kwargs)
    if beams > 1:
        raise LoopscopeError(
            f"generate(num_beams={beams}): beam search reorders the batch rows at every step, so no row is one "
            "sequence to record as a run; use num_beams=1 (greedy or sampling), or close the capture first"
        )
    for name in ASSISTED_DECODING:
        value = generate_setting(model, args, kwargs, name)
        if value is not None and value is not False:
            shown = repr(value) if isinstance(value, (bool, int, float, str)) else "..."
            raise LoopscopeError(
                f"generate({name}={shown}): assisted (speculative) decoding runs the model on draft tokens and "
                f"discards the rejected ones, so its forwards are not one sequence to record as a run; leave out "
                f"{name} while capturing (plain greedy or sampling), or close the capture first"
            )


def note_exit_check(forward: Forward, step: int, exits, values) -> tuple[torch.Tensor | None, str | None]:
    """One check of an adaptive-exit evaluator at ``step``: rows that exit now get ``step`` in ``forward.row_steps``.
    Returns the check's values as [B, T] (one per row: on the last position, NaN elsewhere; one number: every
    row's; None: none) and what could not be read (a user's evaluator may return lists, numbers or None)."""
    batch, problem = forward.batch, None
    decided = _tensor_or_none(exits)
    if decided is not None and decided.numel() in (1, batch):  # one decision: every row's
        if forward.row_steps is None:
            forward.row_steps = np.zeros(batch, dtype=np.int32)
        newly = decided.detach().reshape(-1).to("cpu", torch.bool).numpy() & (forward.row_steps == 0)
        forward.row_steps[newly] = step
    else:
        problem = (
            f"the exit evaluator's decisions ({_described(exits)}) are not one per batch row ({batch}); the rows "
            "are recorded with the batch's iteration count"
        )
    value = _tensor_or_none(values)
    if value is None:  # no values (None) is nothing to record; values that are no numbers are named
        unread = f"the exit evaluator's values ({_described(values)}) are not numbers; exit_value is not recorded"
        return None, problem if values is None else unread
    value = value.detach().float()
    tokens = forward.tokens
    if value.numel() == batch * tokens and (batch == 1 or value.shape[0] == batch):  # one value per token
        return value.reshape(batch, tokens), problem
    if value.numel() in (1, batch):  # one value per row (or one for all), computed on the last position
        per_token = torch.full((batch, tokens), float("nan"), device=value.device)
        per_token[:, -1] = value.reshape(-1)
        return per_token, problem
    return None, problem or (
        f"the exit evaluator's values ({_described(values)}) are neither one per batch row nor one per token; "
        "exit_value is not recorded for them"
    )


def _tensor_or_none(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor) or value is None:
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _described(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def stored_exits(exits: np.ndarray, last: int, stride: int) -> tuple[np.ndarray, str | None]:
    """Rows of an adaptive batch that exited between stored steps (with ``step_stride``) are recorded up to their
    last stored iteration: only the batch's own last iteration is kept off the stride. Also says so, if it happens."""
    off = (exits % stride != 0) & (exits != last)
    if not off.any():
        return exits, None
    return np.where(off, exits - exits % stride, exits), (
        f"with step_stride={stride}, rows of an adaptive batch that exit between stored steps are recorded up to "
        "their last stored iteration; use batch size 1 or step_stride=1 to keep each row's exit state"
    )


def argument(args, kwargs, where: int | str):
    if isinstance(where, str):
        return kwargs.get(where)
    if len(args) > where:
        return args[where]
    return kwargs.get("hidden_states", next(iter(kwargs.values()), None) if kwargs else None)


def mask_for(mask, batch: int, tokens: int) -> torch.Tensor | None:
    """The forward's [B, T] attention mask where it has one (left where it lives); None: every token attended."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= tokens:
        return mask if mask.shape[1] == tokens else mask[:, -tokens:]
    return None


def positions_for(kwargs, tokens: int, offset: int, own_run: bool) -> torch.Tensor | int:
    """The forward's positions: ``position_ids`` ([B, T], or [1, T] for every row), else ``cache_position``
    ([1, T]), else the first position, the others counted from it (the writer makes the arrays): for a forward that
    is a run of its own (``own_run``), the length of a cache passed in (a hand-written decoding loop: each token at
    its place in the sequence, not at 0), else ``offset``. Inside a call the run counts its tokens itself: a cache's
    length is not read per decoded token (Huginn's cache walks every entry to tell it)."""
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == tokens:
        return position_ids if position_ids.dim() == 2 else position_ids.reshape(-1, tokens)
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() == tokens:
        return cache_position.reshape(1, tokens)
    return (own_run and cached_length(kwargs.get("past_key_values"))) or offset


class TokenRecords:
    """A forward's tokens as the writer gets them (a :class:`~loopscope.storage.write.messages.Tokens`): ids, mask
    and positions copied off the model's device, and with a tokenizer each token's text."""

    def __init__(self, transfer: DeviceTransfer, tokenizer):
        self.transfer = transfer
        self.tokenizer = tokenizer
        self._decode_copy = None
        self._unread_mask = False  # a mask of another form, with no call mask to stand for it, was named

    def message(self, session: Session, ids: torch.Tensor, given, positions, keep, first: int) -> messages.Tokens:
        """``ids`` [B, T], the forward's ``attention_mask=`` (any), its ``positions_for``, the stored ``keep``,
        the run's index of its first token. Without a [B, T] mask (a static cache's forwards get 4-D ones) the call's
        stands for it; where neither is known the tokens are stored as attended, said once if a mask was given."""
        mask = mask_for(given, *ids.shape)
        if mask is None and session.inputs is not None:
            mask = session.inputs.mask_of(first, ids.shape[1])
        if mask is None and given is not None and not self._unread_mask:
            self._unread_mask = True
            warnings.warn(
                f"loopscope: the forward's attention_mask ({type(given).__name__}) is not one [batch, tokens] "
                "tensor; its tokens are stored as attended (attention_mask 1)",
                stacklevel=user_stacklevel(),
            )
        host_ids = self.transfer.to_host(ids, torch.int64)
        strings = decode = None
        if self.tokenizer is not None and ids.is_cuda:  # the ids are still on their way: text on the writer's thread
            decode = self._writer_decode()
        elif self.tokenizer is not None:
            strings = messages.token_texts(host_ids if keep is None else host_ids[:, keep], self.tokenizer.decode)
        return messages.Tokens(
            session.run_ids,
            session.offset,
            host_ids,
            None if mask is None else self.transfer.to_host(mask, torch.int8),
            positions if isinstance(positions, int) else self.transfer.to_host(positions, torch.int64),
            session.forwards,
            strings=strings,
            keep=keep,  # applied on the writer's thread
            decode=decode,
            ready=self.transfer.ready_event(),
            scratch=self.transfer.scratch,
        )

    def _writer_decode(self):
        """The tokenizer's ``decode`` for the writer's thread, on a private copy: a fast tokenizer that the model's
        thread is using at the same time (a streamer, a call with padding) can refuse a second thread."""
        if self._decode_copy is None:
            try:
                self._decode_copy = copy.deepcopy(self.tokenizer).decode
            except Exception:  # a tokenizer that cannot be copied: share it
                self._decode_copy = self.tokenizer.decode
        return self._decode_copy
