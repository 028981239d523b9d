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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LoopscopeError, first_line
from ..storage import run_files
from .capture import attach
from .hub import cache_only

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class CaptureSummary:
    path: str
    prompts: int
    tokens: int  # tokens in the file's runs
    device: str


def read_prompts(prompt: str | None, prompt_file: str | os.PathLike | None) -> list[str]:
    """``prompt`` and/or one prompt per non-empty line of ``prompt_file``; an error when that leaves none."""
    prompts = [prompt] if prompt is not None else []
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


def check_counts(steps: int | None, max_new_tokens: int) -> None:
    """Reject impossible counts before any model is loaded."""
    if steps is not None and steps < 1:
        raise LoopscopeError(f"--steps {steps}: give a positive number of iterations")
    if max_new_tokens < 0:
        raise LoopscopeError(f"--max-new-tokens {max_new_tokens}: give 0 or more")


def load_pretrained(name_or_path: str, *, trust_remote_code: bool = False, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode on ``device``, tokenizer). Our reference architecture is registered first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models.huginn_reference import register

    if dtype not in DTYPES:
        raise LoopscopeError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}")
    check_model_path(name_or_path)
    device = _pick_device(device)
    register()
    # a hub id the hub cannot serve is read from the cache alone, or refused at once (no minute of retries)
    hub = not os.path.isdir(os.path.expanduser(name_or_path))
    where = {"local_files_only": True} if hub and cache_only(name_or_path) else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **where)
        model: Any = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype], **where
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoopscopeError(f"cannot load {name_or_path}: {first}") from None
    return model.to(device).eval(), tokenizer


def check_model_path(name_or_path: str) -> None:
    """A path that does not exist is named as such: transformers would take it for a hub id and say the id is
    malformed or unknown, which sends the user looking for a typo in a repository name."""
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise LoopscopeError(
            f"model directory {name_or_path} has no config.json; pass a directory saved with save_pretrained"
        )
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
    check_counts(steps, max_new_tokens)
    extra: dict[str, Any] = {}
    if criterion is not None or exit_threshold is not None:
        if not max_new_tokens or not hasattr(model, "generate_with_adaptive_compute"):
            raise LoopscopeError(
                "--criterion/--exit-threshold need a model with Huginn's adaptive generate and --max-new-tokens > 0"
            )
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
    capture = attach(model, out, tokenizer=tokenizer, mode=mode, **capture_options)
    try:
        _run_prompts(model, capture, encoded, device, seed, max_new_tokens, pad, extra, on_prompt)
    except BaseException:
        if mode != "a":  # a capture this call made and that recorded nothing is no data: leave no file behind
            _remove_if_empty(capture.path)
        raise
    from ..storage.reader import CaptureFile

    with CaptureFile(capture.path) as written:
        tokens = sum(run.num_tokens for run in written.runs)
    return CaptureSummary(capture.path, len(prompts), tokens, str(device))


def _run_prompts(model, capture, encoded, device, seed, max_new_tokens, pad, extra, on_prompt) -> None:
    """One generate() (or forward) per prompt, with ``capture`` attached; a model's refusal becomes one line."""
    with capture, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="loopscope: .* closed the capture")  # the error below says it
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


def _remove_if_empty(path: str) -> None:
    """Remove a capture whose run folder holds no run file at all, complete or not (nothing was recorded)."""
    with contextlib.suppress(OSError, LoopscopeError):  # the error being raised matters, not this
        if run_files.list_run_files(path):
            return
        os.remove(path)
        os.rmdir(run_files.runs_dir(path))


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
        raise LoopscopeError(f"--device {device}: use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LoopscopeError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device
