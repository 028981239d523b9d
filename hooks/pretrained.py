"""Capture a saved or hub model on a list of prompts: what ``loopscope capture MODEL_OR_PATH`` runs.

Loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (a local directory needs no network), attaches loopscope,
and runs one ``generate()`` per prompt (one ``forward()`` when no new tokens are asked for). One call per prompt,
not one padded batch, because Huginn ignores the attention mask: padding would change its states.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from ..errors import LoopscopeError, first_line
from ..families.checkpoint import read_config
from ..storage import run_files, safety
from ..storage.dependencies import CaptureFiles
from .capture import attach
from .hub import cache_only

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CaptureSummary:
    path: str
    prompts: int
    tokens: int  # tokens in the file's runs
    device: str


def read_prompts(prompt: str | Sequence[str] | None, prompt_file: str | os.PathLike | None) -> list[str]:
    """``prompt`` (one text or several) and/or one prompt per non-empty line of ``prompt_file``; an error when that
    leaves none."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or ())
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as handle:
                prompts += [line.rstrip("\n") for line in handle if line.strip()]
        except FileNotFoundError:
            raise LoopscopeError(f"prompt file {prompt_file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LoopscopeError(f"cannot read prompt file {prompt_file}: {exc}") from None
    if any(not p.strip() for p in prompts):
        raise LoopscopeError("a prompt is empty; give some text")
    if not prompts:
        raise LoopscopeError("no prompt: pass --prompt TEXT or --prompt-file FILE")
    return prompts


def check_counts(steps: int | None, max_new_tokens: int, *, seed: int | None = None, tokens=None) -> None:
    """Reject impossible counts (and a token selection known to store nothing) before any model is loaded."""
    if steps is not None and steps < 1:
        raise LoopscopeError(f"--steps {steps}: give a positive number of iterations")
    if max_new_tokens < 0:
        raise LoopscopeError(f"--max-new-tokens {max_new_tokens}: give 0 or more")
    if seed is not None and not 0 <= seed < 2**63:
        raise LoopscopeError(f"--seed {seed}: give a number from 0 to {2**63 - 1}")
    if tokens == "generated" and not max_new_tokens:
        raise LoopscopeError(
            "--tokens generated stores only generated tokens, and none are generated without --max-new-tokens N "
            "(N > 0): nothing would be stored"
        )


def check_inputs(out: str | os.PathLike, name_or_path: str, prompt_file: str | os.PathLike | None) -> None:
    """:func:`check_model_path`, then refuse an ``out`` that is one of the capture's own inputs: a file of the local
    model directory, or the prompt file. Writing there (mode 'w') would destroy what the capture reads."""
    check_model_path(name_or_path)
    inputs = CaptureFiles()
    if prompt_file is not None:
        inputs.files[os.fspath(prompt_file)] = "the prompt file"
    folder = os.path.expanduser(name_or_path)
    if os.path.isdir(folder):
        for root, _, names in os.walk(folder):
            for name in names:
                inputs.files[os.path.join(root, name)] = f"a file of model directory {safety.clean(name_or_path)}"
    clash = inputs.holding(out)
    if clash is not None:
        raise LoopscopeError(f"--out {clash}; writing the capture there would destroy it: choose another --out")


def load_pretrained(name_or_path: str, *, trust_remote_code: bool = False, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on ``device``, tokenizer). Our reference architecture is registered first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import huginn_reference, ouro_reference

    if dtype not in DTYPES:
        raise LoopscopeError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_model_path(name_or_path)
    device = _pick_device(device)
    huginn_reference.register()
    ouro_reference.register()
    # a hub id the hub cannot serve is read from the cache alone, or refused at once (no minute of retries)
    hub = not os.path.isdir(os.path.expanduser(name_or_path))
    where = {"local_files_only": True} if hub and cache_only(name_or_path) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **where)
    except LOAD_ERRORS as exc:
        if "backend tokenizer" in str(exc):  # transformers found no tokenizer file to build one from
            raise LoopscopeError(
                f"{name_or_path} has no tokenizer (no tokenizer.json, tokenizer_config.json or vocabulary file); "
                "save one there with tokenizer.save_pretrained"
            ) from None
        raise _load_error(name_or_path, exc, trust_remote_code) from None
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype], **where
        )
    except LOAD_ERRORS as exc:
        raise _load_error(name_or_path, exc, trust_remote_code) from None
    return model.to(device).eval(), tokenizer


LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, SafetensorError)


def _load_error(name_or_path: str, exc: BaseException, trust_remote_code: bool) -> LoopscopeError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    remote = not trust_remote_code and ("custom code" in str(exc) or "trust_remote_code" in str(exc))
    hint = "; a model with its own code needs trust_remote_code=True (if you trust that code)" if remote else ""
    return LoopscopeError(f"cannot load {name_or_path}: {first}{hint}")


def check_model_path(name_or_path: str) -> None:
    """A path that does not exist is named as such: transformers would take it for a hub id and say the id is
    malformed or unknown, which sends the user looking for a typo in a repository name."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise LoopscopeError(
            f"model directory {name_or_path} has no config.json; pass a directory saved with save_pretrained"
        )
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        read_config(config)
    if os.path.exists(path) or not _looks_like_path(name_or_path):
        return
    raise LoopscopeError(
        f"model directory {name_or_path} does not exist; pass a directory saved with save_pretrained, "
        "or a hub id such as org/name"
    )


def _looks_like_path(name: str) -> bool:
    """Not a hub id (``name`` or ``org/name``): starts like a path, has more than one separator, or its parent is
    a directory here."""
    separators = {c for c in ("/", os.sep, os.altsep) if c}
    if name.startswith((".", "~")) or name[:1] in separators or any(c in name for c in separators - {"/"}):
        return True
    if sum(name.count(c) for c in separators) > 1:  # org/name/sub: a hub id has one "/" at most
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(parent)


def capture_prompts(
    model,
    tokenizer,
    prompts: list[str],
    out: str | os.PathLike,
    *,
    steps: int | None = None,
    max_new_tokens: int = 0,
    mode: str = "w-",
    seed: int | None = 0,
    on_prompt: Callable[[int], None] | None = None,
    criterion: str | None = None,
    exit_threshold: float | None = None,
    **capture_options,
) -> CaptureSummary:
    """Record every prompt (one run each) into ``out``; ``steps`` becomes the model's ``num_steps`` argument.

    ``seed`` reseeds torch before each prompt, so a capture of a model with a random initial state (Huginn draws
    s0 at random) can be repeated exactly; None leaves the RNG alone. ``criterion`` / ``exit_threshold`` switch on
    Huginn's adaptive exit in ``generate()``; ``capture_options`` go to :func:`attach` (``tokens``, ``step_stride``).
    """
    check_counts(steps, max_new_tokens, seed=seed, tokens=capture_options.get("tokens"))
    extra: dict[str, Any] = {}
    if criterion is not None or exit_threshold is not None:
        if not hasattr(model, "generate_with_adaptive_compute"):
            name = type(model).__name__
            raise LoopscopeError(f"--criterion/--exit-threshold need Huginn's adaptive generate; {name} has none")
        if not max_new_tokens:  # the exit applies to generated tokens only: say just that
            raise LoopscopeError("--criterion/--exit-threshold act on generated tokens: give --max-new-tokens > 0")
        if exit_threshold is not None and not (math.isfinite(exit_threshold) and exit_threshold >= 0):
            raise LoopscopeError(f"--exit-threshold {exit_threshold}: give a number >= 0 (or leave it out: auto)")
        extra["criterion"] = criterion or "kl"
        extra["exit_threshold"] = "auto" if exit_threshold is None else exit_threshold
    if steps is not None:
        if "num_steps" not in inspect.signature(model.forward).parameters:
            raise LoopscopeError(
                f"{type(model).__name__} takes no num_steps argument: its iteration count is set in its config; "
                "drop --steps"
            )
        extra["num_steps"] = steps
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(prompt, return_tensors="pt").input_ids for prompt in prompts]
    for i, ids in enumerate(encoded):  # every prompt checked before the capture file is made
        if ids.shape[1] == 0:
            raise LoopscopeError(f"prompt {i} encodes to no tokens; give some text")
        _check_context(model, i, ids.shape[1], max_new_tokens)
    _check_selects(capture_options.get("tokens"), max(ids.shape[1] for ids in encoded) + max_new_tokens)
    before = set(run_files.list_run_files(os.fspath(out))) if mode == "a" else set()
    capture = attach(model, out, tokenizer=tokenizer, mode=mode, **capture_options)
    try:
        _run_prompts(model, capture, encoded, device, seed, max_new_tokens, pad, extra, on_prompt)
    except BaseException:
        if mode != "a":  # a capture this call made and that recorded nothing is no data: leave no file behind
            _remove_capture(capture.path, only_if_empty=True)
        raise
    from ..storage.reader import CaptureFile

    with CaptureFile(capture.path) as written:
        tokens = sum(run.num_tokens for run in written.runs)
        stored = sum(run.num_tokens for run in written.runs if run.index not in before)
    if not stored:
        if mode != "a":  # this call's file holds nothing: leave none behind
            _remove_capture(capture.path)
        raise LoopscopeError(
            f"nothing was stored: the token selection kept no token of any of the {len(prompts)} prompt(s) "
            "(generate() may have stopped early); widen --tokens or raise --max-new-tokens"
        )
    return CaptureSummary(capture.path, len(prompts), tokens, str(device))


def _run_prompts(model, capture, encoded, device, seed, max_new_tokens, pad, extra, on_prompt) -> None:
    """One generate() (or forward) per prompt, with ``capture`` attached; a model's refusal becomes one line."""
    with capture, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="loopscope: .* closed the capture")  # the error below says it
        warnings.filterwarnings("ignore", message="loopscope: tokens= kept none")  # checked before and after, here
        for i, ids in enumerate(encoded):
            if seed is not None:
                torch.manual_seed(seed)
            try:
                with torch.no_grad():
                    if max_new_tokens:
                        model.generate(
                            ids.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra
                        )
                    else:
                        model(ids.to(device), **extra)
            except LoopscopeError:
                raise
            except (ValueError, TypeError, IndexError, RuntimeError) as exc:  # the model refused what it was given
                raise LoopscopeError(
                    f"the model failed on prompt {i}: {type(exc).__name__}: {first_line(exc)}"
                ) from exc
            if on_prompt is not None:
                on_prompt(i)


def _remove_capture(path: str, *, only_if_empty: bool = False) -> None:
    """Remove a capture this call made: its run files, run folder, then its index (last, so that whatever cannot be
    removed is still a capture the reader lists). ``only_if_empty``: only when it holds no run file at all, complete
    or not (nothing was recorded)."""
    with contextlib.suppress(OSError, LoopscopeError):  # the error being raised matters, not this
        found = run_files.list_run_files(path)
        if found and only_if_empty:
            return
        for run_file, _ in found.values():
            os.remove(run_file)
        os.rmdir(run_files.runs_dir(path))
        os.remove(path)


def _check_selects(tokens, longest: int) -> None:
    """Refuse token indices past every run before anything is written: they would store nothing."""
    from .selection import TokenSelection

    if tokens is None or isinstance(tokens, str):
        return
    selection = TokenSelection.parse(tokens)
    kept = selection.keep(longest, np.arange(longest))  # all given: none generated
    if kept is not None and not kept.size:
        raise LoopscopeError(
            f"{selection.describe()} select no token: the longest run has {longest} tokens (indices 0 to "
            f"{longest - 1}), so nothing would be stored; pick lower indices"
        )


#: Config fields that bound a model's sequence length outright (a position table that ends there).
HARD_CONTEXT = ("block_size", "n_positions")


def _check_context(model, index: int, tokens: int, max_new_tokens: int) -> None:
    """A prompt (plus the tokens to generate) longer than a fixed position table is refused before anything runs:
    the model would fail deep inside with an index or shape error. Rotary models' ``max_position_embeddings`` is
    no hard limit, so it is left to the model."""
    config = getattr(model, "config", None)
    for name in HARD_CONTEXT:
        limit = getattr(config, name, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and tokens + max_new_tokens > limit > 0:
            asked = f"{tokens} token{'s' * (tokens != 1)}" + (f" + {max_new_tokens} new" if max_new_tokens else "")
            raise LoopscopeError(
                f"prompt {index} needs {asked}, past the model's context ({name}={limit}); shorten it"
                + (" or lower --max-new-tokens" if max_new_tokens else "")
            )


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise LoopscopeError(f"--device {device}: use cpu, cuda, cuda:N or auto")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LoopscopeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise LoopscopeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
