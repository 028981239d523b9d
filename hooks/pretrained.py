"""Capture a saved or hub model on a list of prompts: what ``loopscope capture MODEL_OR_PATH`` runs.

Loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` (a local directory needs no network), attaches loopscope,
and runs one ``generate()`` per prompt (one ``forward()`` when no new tokens are asked for). One call per prompt,
not one padded batch, because Huginn ignores the attention mask: padding would change its states.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import LoopscopeError
from .capture import attach

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
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        model: Any = AutoModelForCausalLM.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, dtype=DTYPES[dtype]
        )
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoopscopeError(f"cannot load {name_or_path}: {first}") from None
    return model.to(device).eval(), tokenizer


def check_model_path(name_or_path: str) -> None:
    """A path that does not exist is named as such: transformers would take it for a hub id and say the id is
    malformed or unknown, which sends the user looking for a typo in a repository name."""
    if os.path.exists(os.path.expanduser(name_or_path)) or not _looks_like_path(name_or_path):
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
    with attach(model, out, tokenizer=tokenizer, mode=mode, **capture_options) as capture:
        for i, prompt in enumerate(prompts):
            encoded = tokenizer(prompt, return_tensors="pt")
            ids = encoded.input_ids.to(device)
            if ids.shape[1] == 0:
                raise LoopscopeError(f"prompt {i} encodes to no tokens; give some text")
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                if max_new_tokens:
                    model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, **extra)
                else:
                    model(ids, **extra)
            if on_prompt is not None:
                on_prompt(i)
        path = capture.path
    from ..storage.reader import CaptureFile

    with CaptureFile(path) as written:
        tokens = sum(run.num_tokens for run in written.runs)
    return CaptureSummary(path, len(prompts), tokens, str(device))


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
