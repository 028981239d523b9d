"""The readout lens: what every stored iteration would predict, and when the prediction settles.

``lens(run, model)`` reads each stored state out into a next-token distribution p_k and measures it against the
token's last step (see :class:`~loopscope.analysis.lens_result.LensResult`). Two kinds:

* ``"logit"``: the family's readout (final norm and head) applied to s_k, token by token. Streamed in blocks of
  tokens, memory bounded by block x steps x vocabulary, from a loaded model or from a checkpoint directory (only
  the head's matrix is read then; ``lens_readout.py``).
* ``"coda"`` (Huginn-shaped models): each step's states of all the run's tokens go through the layers after the
  loop, with causal attention over the run's own tokens, then ``ln_f`` and the head, as the model does with its last
  state (its ``predict_from_latents``). Exact for a prefill run: its last step gives the model's own logits. For
  decoded tokens it is an approximation: in generation a token attended to the earlier tokens' *final* states
  (cached), here to their states at the same step k (a token past its own last step keeps its last state).

Numerics: states are read as float32 (bf16 widened exactly), the readout runs in the model's dtype and returns
float32 logits, and log-probabilities, entropies and KL divergences are taken in float64, so a KL of 1e-7 near
convergence keeps its digits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import families
from ..errors import LoopscopeError
from ..families.adapter import LoopSpec
from ..families.checkpoint import read_config
from ..storage.reader import Run
from . import lens_readout
from .coda_lens import check_whole_sequence, coda_lens
from .lens_measure import assemble, measure
from .lens_result import KINDS, LensResult

#: Working memory per block of tokens (logits, log-probabilities and one scratch array, all steps, all tokens).
BLOCK_BYTES = 256 << 20


def lens(
    run: Run,
    model: nn.Module | str | os.PathLike,
    kind: str = "logit",
    *,
    loop: str | None = None,
    top_k: int = 5,
    tokenizer=None,
    trust_remote_code: bool = False,
    readout: str | Sequence[str] | None = None,
    block_tokens: int | None = None,
) -> LensResult:
    """What each stored step of ``run`` would predict, read out through ``model``.

    ``model``: a loaded model, or a local checkpoint directory (the logit lens then reads only the head's weights;
    the coda lens loads the model). ``loop``: which loop (default the run's first). ``top_k``: how many of the most
    probable tokens to keep per step. ``tokenizer``: decodes the top-1 predictions (from the directory by default).
    ``readout``: module paths that turn a state into logits, for models loopscope knows no readout of.
    ``block_tokens``: tokens per block (default: what fits ``BLOCK_BYTES``).
    """
    if kind not in KINDS:
        raise LoopscopeError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    for name, value in (("top_k", top_k), ("block_tokens", 1 if block_tokens is None else block_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoopscopeError(f"{name}={value!r} must be a positive integer, e.g. 5")
    loop = check_loop(run, loop)
    if kind == "coda":
        check_whole_sequence(run)  # before a checkpoint is loaded for nothing
    if not isinstance(model, nn.Module):
        directory = Path(model)
        check_directory(directory, run)
        if tokenizer is None:
            tokenizer = tokenizer_of(directory, trust_remote_code)
        if kind == "coda" or readout is not None:
            model = _load(directory, trust_remote_code)
    if kind == "coda":
        assert isinstance(model, nn.Module)
        family, spec = _spec(run, model, loop)
        if spec.lens:  # the coda ends in the same head: a model of another size fails here, in one line
            check_readout(run, loop, readout_for(run, model, loop))
        result = coda_lens(run, model, loop, family, top_k)
    else:
        result = logit_lens(run, loop, readout_for(run, model, loop, readout), top_k, block_tokens)
    result.tokens, result.positions = run.tokens, run.positions
    if tokenizer is not None:
        result.top1_text = top1_texts(result.top1, tokenizer)
    return result


def readout_for(
    run: Run, model: nn.Module | str | os.PathLike, loop: str, readout: str | Sequence[str] | None = None
) -> lens_readout.Readout:
    """The readout of ``loop`` from a loaded model (its family's modules, or ``readout=``) or from a checkpoint
    directory already checked with :func:`check_directory`. Not checked against a run's sizes: that is
    :func:`check_readout`, which :func:`logit_lens` calls for each run it reads."""
    family, spec = _spec(run, model, loop)
    if isinstance(model, nn.Module):
        return lens_readout.from_model(model, spec, family, [readout] if isinstance(readout, str) else readout)
    norm_module = _stored_adapter(run).get("readout")
    return lens_readout.from_directory(model, run, spec, family, norm_module if isinstance(norm_module, str) else None)


def block_measures(
    run: Run, loop: str, head: lens_readout.Readout, t0: int, t1: int, last: np.ndarray, top_k: int
) -> dict[str, np.ndarray]:
    """The lens measures of tokens t0:t1 (``last``: their last steps), read from the file and read out by ``head``:
    one block of the logit lens, here or in a Dask task."""
    states = run.decode(run.read(np.s_[t0:t1], loop), loop)
    return measure(head.apply(torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32))), last, top_k)


def logit_lens(
    run: Run, loop: str, head: lens_readout.Readout, top_k: int, block_tokens: int | None = None
) -> LensResult:
    """The logit lens of one run and loop through ``head`` (from :func:`readout_for`): one readout serves every run
    of a capture, so a caller with many runs reads the head's weights once. Checked against this run's sizes."""
    check_readout(run, loop, head)
    last = run.steps_of(loop).astype(np.int64)
    n_tokens, n_slots, _ = run.dataset(loop).shape
    per_token = max(n_slots * head.vocab * (4 + 8), 1)  # float32 logits and float64 log-probabilities, all steps
    block = block_tokens or max(1, BLOCK_BYTES // per_token)
    pieces: list[dict[str, np.ndarray]] = []
    for t0 in range(0, n_tokens, block):
        t1 = min(t0 + block, n_tokens)
        pieces.append(block_measures(run, loop, head, t0, t1, last[t0:t1], top_k))
    parts = {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]} if pieces else {}
    if not parts:
        raise LoopscopeError(f"run {run.index} has no tokens to read out")
    return assemble(run, loop, "logit", parts, last)


def check_loop(run: Run, loop: str | None) -> str:
    """``loop``, or the run's first when None; a loop the run lacks is a one-line error."""
    if loop is None:
        return run.loops[0]
    if loop not in run.loops:
        raise LoopscopeError(f"run {run.index} has no loop {loop!r}; it has {', '.join(run.loops)}")
    return loop


def _spec(run: Run, model: nn.Module | str | os.PathLike, loop: str) -> tuple[str, LoopSpec]:
    """The family and loop description to read out with: the capture's own, or a loaded model's, which must be of
    the family the capture was made with."""
    family, spec = _stored_spec(run, loop)
    return _model_spec(model, run, loop, family, spec) if isinstance(model, nn.Module) else (family, spec)


def _stored_spec(run: Run, loop: str) -> tuple[str, LoopSpec]:
    """The family and loop the capture recorded (its header holds the adapter it was made with)."""
    adapter = _stored_adapter(run)
    family = str(adapter.get("family", "?"))
    return family, lens_readout.spec_of(adapter.get("loops") or [], family, loop)


def _stored_adapter(run: Run) -> dict:
    """The loop adapter the capture was made with, as its header records it."""
    adapter = run.capture.meta.get("loop_json")
    if isinstance(adapter, str):
        try:
            adapter = json.loads(adapter)
        except ValueError:
            adapter = None
    if not isinstance(adapter, dict):
        raise LoopscopeError(f"{run.capture.path} does not describe its loop adapter; re-capture it")
    return adapter


def _model_spec(model: nn.Module, run: Run, loop: str, family: str, stored: LoopSpec) -> tuple[str, LoopSpec]:
    """The loaded model's own description of the loop, which must be of the family the capture was made with."""
    adapter = families.match(model)
    if adapter is None:  # detected or custom loops: the capture's own record (readout= names the head)
        return family, stored
    if adapter.family != family:
        raise LoopscopeError(
            f"{run.capture.path} was captured from a {family} model; {type(model).__name__} is {adapter.family}: "
            "pass the model the capture was made with"
        )
    for spec in adapter.loops:
        if spec.name == loop:
            return family, spec
    return family, stored


def check_readout(run: Run, loop: str, head: lens_readout.Readout) -> None:
    """``head`` reads this run's states of ``loop`` and knows its token ids, or a one-line error naming the fix."""
    hidden, vocab, source = head.hidden, head.vocab, head.source
    width = run.hidden_size(loop)
    if hidden != width:
        raise LoopscopeError(
            f"the readout ({source}) reads {hidden}-wide states, the capture's loop {loop!r} stores {width}-wide "
            "ones: pass the model the capture was made with"
        )
    ids = run.token_ids
    if ids.size and int(ids.max()) >= vocab:
        raise LoopscopeError(
            f"the capture holds token id {int(ids.max())}, past the readout's vocabulary of {vocab} ({source}): "
            "pass the model the capture was made with"
        )


def check_directory(directory: Path, run: Run) -> None:
    """A directory that is a checkpoint of the captured model, by its config's model type, architecture and state
    width. (Its weights are compared where the lens reads them: ``lens_readout`` checks its readout norm.)"""
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise LoopscopeError(f"model directory {directory} does not exist; pass a local checkpoint directory")
    if not config_path.is_file():
        raise LoopscopeError(f"{directory} has no config.json; pass the checkpoint directory of the captured model")
    config = read_config(config_path)
    stored = run.capture.meta.get("config_json")
    if isinstance(stored, dict):
        for key in ("model_type", "architectures"):  # same sizes are not the same model (a GPT-2 as wide, say)
            ours, theirs = stored.get(key), config.get(key)  # architectures: written only by save_pretrained
            if ours is not None and theirs != ours and (theirs is not None or key == "model_type"):
                raise LoopscopeError(
                    f"{directory} has {key}={config.get(key)!r}, the capture's model {stored[key]!r}: "
                    "pass the checkpoint the capture was made with"
                )
        for key in ("hidden_size", "n_embd", "d_model", "vocab_size"):
            if key in stored and key in config and stored[key] != config[key]:
                raise LoopscopeError(
                    f"{directory} has {key}={config[key]}, the capture's model {stored[key]}: "
                    "pass the checkpoint the capture was made with"
                )


def _known_model_types() -> None:
    """Let transformers' Auto classes read checkpoints of loopscope's own models (the demo's), as ``capture`` does."""
    from ..models import huginn_reference, ouro_reference

    huginn_reference.register()
    ouro_reference.register()


def tokenizer_of(directory: Path, trust_remote_code: bool):
    """The directory's tokenizer when it has one (the grid then shows text), else None (ids)."""
    _known_model_types()
    if not any((directory / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError):
        return None


def _load(directory: Path, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    _known_model_types()
    try:
        # in the checkpoint's own dtype, as the captured model ran (transformers 4.x would widen bf16 to float32)
        model = AutoModelForCausalLM.from_pretrained(str(directory), trust_remote_code=trust_remote_code, dtype="auto")
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = "" if trust_remote_code else " (a model with its own code needs trust_remote_code=True)"
        raise LoopscopeError(f"cannot load {directory}: {first}{hint}") from None
    return model.eval()


def top1_texts(top1: np.ndarray, tokenizer) -> np.ndarray:
    """[T, K] object array of each top-1 id's text ("" past a token's last step), each distinct id decoded once."""
    out = np.full(top1.shape, "", dtype=object)
    for token_id in np.unique(top1[top1 >= 0]):
        out[top1 == token_id] = tokenizer.decode([int(token_id)])
    return out
