"""The readout a lens applies to stored states: the model's own modules, or two tensors read from a checkpoint.

From a loaded model, the family says which modules turn a loop's state into logits (``LoopSpec.lens``, e.g.
Huginn's ``transformer.ln_f`` then ``lm_head``), and they run as the model runs them. From a checkpoint directory
nothing is loaded but what the readout needs: the capture already stores the readout norm's parameters, so only the
head's weight (or the embedding a tied head shares) is read, with ``safetensors.safe_open``, from a single file or
from the shard that ``model.safetensors.index.json`` names. A 3.5B checkpoint then costs one matrix, not the model
(and the norm's weight, one vector, to check that the checkpoint is the captured model's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import torch
from torch import nn

from ..errors import LoopscopeError, first_line
from ..families.adapter import LoopSpec
from ..storage.reader import Run
from ..storage.readout import same_parameters

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class Readout:
    """States [..., H] (float32) -> next-token logits [..., V] (float32), and the sizes it expects and gives."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    hidden: int
    vocab: int
    source: str  # for messages: "model.lm_head", or the checkpoint file the head came from


def spec_of(loops: Sequence[dict], family: str, loop: str) -> LoopSpec:
    """The capture's stored description of ``loop`` as a LoopSpec (lens fields included when it has them)."""
    for stored in loops:
        if isinstance(stored, dict) and stored.get("name") == loop:
            known = {k: v for k, v in stored.items() if k in LoopSpec.__dataclass_fields__}
            for key in ("lens", "nesting"):
                if key in known:
                    known[key] = tuple(known[key])
            known.pop("signals", None)
            return LoopSpec(**known)
    raise LoopscopeError(f"the capture's {family} adapter does not describe loop {loop!r}")


def from_model(model: nn.Module, spec: LoopSpec, family: str, override: Sequence[str] | None) -> Readout:
    """The model's own readout modules, applied in order in the model's dtype; logits come back as float32."""
    paths = tuple(override) if override else spec.lens
    if not paths:
        why = spec.no_lens or f"loopscope knows no readout for the {family} family"
        raise LoopscopeError(f"loop {spec.name!r} has no logit lens: {why}; pass readout= with module paths")
    modules = []
    for path in paths:
        try:
            modules.append(model.get_submodule(path))
        except AttributeError:
            raise LoopscopeError(
                f"readout module {path!r} is not in {type(model).__name__}; pass readout= with module paths "
                "that turn a state into logits"
            ) from None
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32

    @torch.no_grad()
    def apply(states: torch.Tensor) -> torch.Tensor:
        x = states.to(dtype)
        for module in modules:
            x = module(x)
            if isinstance(x, (tuple, list)):
                x = x[0]
        return x.float()

    hidden = _hidden_of(modules[0], model)
    vocab = int(apply(torch.zeros(1, 1, hidden)).shape[-1])  # one tiny call: the head's output size, however built
    return Readout(apply, hidden, vocab, paths[-1])


def from_directory(
    directory: str | os.PathLike, run: Run, spec: LoopSpec, family: str, norm_module: str | None = None
) -> Readout:
    """The stored readout norm, then the head's matrix read from the checkpoint (and, to check that the checkpoint
    is the captured model's, its copy of the norm ``norm_module`` when it has one; nothing else is read)."""
    folder = Path(directory)
    if spec.lens_head is None and spec.no_lens:  # no head reads this loop's states, from a checkpoint or not
        raise LoopscopeError(f"{family} loop {spec.name!r} has no logit lens ({spec.no_lens}); read another loop")
    if spec.lens_head is None:
        raise LoopscopeError(
            f"the logit lens of {family} loop {spec.name!r} cannot be read from a checkpoint (its head is more than "
            "one matrix after the readout norm); load the model and pass it from Python: lens(run, model)"
        )
    files = _weight_files(folder)
    bias_name = spec.lens_head.removesuffix("weight") + "bias"
    weight = _read_tensor(files, spec.lens_head)
    if weight is None and spec.lens_tied:  # a tied head: the checkpoint stores only the embedding it shares
        weight = _read_tensor(files, spec.lens_tied)
    if weight is None:
        wanted = " or ".join(n for n in (spec.lens_head, spec.lens_tied) if n)
        raise LoopscopeError(
            f"{folder} has no tensor {wanted} in its safetensors files; is it this model's checkpoint?"
        )
    bias = _read_tensor(files, bias_name)
    norm = run.capture.readout
    if norm_module and norm.weight is not None:
        _check_norm(_read_tensor(files, f"{norm_module}.weight"), norm.weight, folder, norm_module)

    @torch.no_grad()
    def apply(states: torch.Tensor) -> torch.Tensor:
        normed = torch.from_numpy(norm(states.numpy())).float() if norm.kind not in ("none", "identity") else states
        return nn.functional.linear(normed, weight, bias)

    source = str(files.get(spec.lens_head, files.get(spec.lens_tied or "")) if isinstance(files, dict) else files)
    return Readout(apply, int(weight.shape[1]), int(weight.shape[0]), source)


def _check_norm(theirs: torch.Tensor | None, ours: np.ndarray, folder: Path, module: str) -> None:
    """The checkpoint's readout norm is the one the capture stored, up to the rounding of a model run in bfloat16 or
    float16: a checkpoint of the same architecture with other weights (another training step, the instruct model
    for the base one) has a head of the right size too, and would give other predictions without a word."""
    if theirs is None:  # saved under another name: nothing to compare
        return
    if not same_parameters(theirs.double().numpy(), ours):
        raise LoopscopeError(
            f"{folder} holds another {module}.weight than the captured model's: it is not the checkpoint the capture "
            "was made with; pass that one"
        )


def _read_tensor(files: dict[str, Path] | Path, name: str) -> torch.Tensor | None:
    """One tensor as float32, opening only the file that holds it; None when the checkpoint lacks it."""
    path = files.get(name) if isinstance(files, dict) else files
    if path is None:
        return None
    if not path.is_file():
        raise LoopscopeError(f"{path} is missing (the checkpoint's {INDEX_FILE} names it); re-download the checkpoint")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).float() if name in handle.keys() else None
    except (OSError, safetensors.SafetensorError) as exc:
        raise LoopscopeError(f"cannot read {path}: {first_line(exc)}; re-download the checkpoint") from None


def _weight_files(folder: Path) -> dict[str, Path] | Path:
    """{tensor name: shard} from a sharded checkpoint's index, or the one safetensors file."""
    if not folder.is_dir():
        raise LoopscopeError(f"model directory {folder} does not exist; pass a local checkpoint directory")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LoopscopeError(f"{index} is not a safetensors index (no weight_map); re-download it") from None
        return {name: folder / str(shard) for name, shard in weight_map.items()}
    single = folder / SINGLE_FILE
    if single.is_file():
        return single
    raise LoopscopeError(
        f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; the lens reads the head from safetensors weights"
    )


def _hidden_of(first: nn.Module, model: nn.Module) -> int:
    """The state width the first readout module takes (a Linear's in_features, a norm's weight, else the config)."""
    for name in ("in_features", "normalized_shape"):
        value = getattr(first, name, None)
        if isinstance(value, int):
            return value
        if isinstance(value, (tuple, list)) and value:
            return int(value[-1])
    weight = getattr(first, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 1:
        return int(weight.shape[-1])
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise LoopscopeError(f"cannot tell the state width {type(first).__name__} reads; pass readout= explicitly")
