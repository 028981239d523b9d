"""The coda lens (Huginn-shaped models): each stored step's states of all a run's tokens decoded through the layers
after the loop, as the model decodes its last state.

At step k the whole sequence of step-k states goes through the model's ``coda_method`` (Huginn's
``predict_from_latents``: ``ln_f``, the coda blocks with causal attention over the run's tokens, ``ln_f``, the head)
at the run's positions. A prefill run's last step is then exactly the model's own forward. A decoded token attended
in generation to the earlier tokens' cached final states; here it attends to their step-k states (a token past its
own last step keeps its last state), which is the approximation this lens makes for generated tokens. A run that
stored some tokens only (``tokens=``) is refused: its tokens would attend to each other alone.

Memory: a few [T, V] arrays (the last step's logits, the previous step's, the current one), on top of the model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import families
from ..errors import LoopscopeError
from ..storage import safety
from ..storage.reader import Run
from .lens_measure import assemble, stack_steps, step_measures
from .lens_result import LensResult


def coda_lens(run: Run, model: nn.Module, loop: str, family: str, top_k: int) -> LensResult:
    adapter = families.match(model)
    method = getattr(model, adapter.coda_method, None) if adapter is not None and adapter.coda_method else None
    if method is None:
        raise LoopscopeError(
            f"--kind coda needs a model with a coda after its loop (Huginn-shaped); {family} has none: "
            "use the logit lens (kind='logit')"
        )
    check_whole_sequence(run)
    states = run.decode(run.read(np.s_[:], loop), loop)  # [T, K, H]: every step of every token is needed
    last = run.steps_of(loop).astype(np.int64)
    n_tokens, n_slots, hidden = states.shape
    parameter = next(model.parameters())
    positions = torch.as_tensor(np.asarray(run.positions, dtype=np.int64)).reshape(1, -1).to(parameter.device)

    @torch.no_grad()
    def logits_at(step: int) -> torch.Tensor:
        """[T, V] float32: the run's tokens at ``step`` (past their last: their last), decoded through the coda."""
        rows = np.minimum(step, last)
        x = torch.from_numpy(np.ascontiguousarray(states[np.arange(n_tokens), rows], dtype=np.float32))
        x = x.to(device=parameter.device, dtype=parameter.dtype)[None]
        return method(x, position_ids=positions).logits[0].float().cpu()

    final = torch.empty(0)
    for step in np.unique(last):  # each token's last-step distribution (one pass per distinct last step)
        at = logits_at(int(step))
        final = torch.empty_like(at) if final.numel() == 0 else final
        final[torch.as_tensor(last == step)] = at[torch.as_tensor(last == step)]
    parts = _per_step(logits_at, final, last, n_slots, top_k)
    return assemble(run, loop, "coda", parts, last)


def check_whole_sequence(run: Run) -> None:
    """Refuse a run that left out earlier tokens (``tokens=[...]``, ``"generated"``): its stored tokens would attend
    to each other only, and every prediction would be silently wrong. The attended rows (a left-padded row's pads
    aside, as its ``attention_mask`` records them) must sit at positions 0, 1, ... with none missing."""
    positions = np.asarray(run.positions, dtype=np.int64)
    attended = positions[np.asarray(run.attention_mask) != 0]
    if np.array_equal(attended, np.arange(len(attended))) or np.array_equal(positions, np.arange(len(positions))):
        return
    options = run.capture.meta.get("options_json")
    selection = options.get("tokens") if isinstance(options, dict) else None
    kept = f" (token selection: {safety.clean(selection)[:80]})" if isinstance(selection, str) else ""
    raise LoopscopeError(
        f"the coda lens needs every token up to the last one stored; run {run.index} stored {run.num_tokens} of "
        f"{int(positions.max()) + 1 if positions.size else 0}{kept}: use the logit lens (--kind logit) or capture "
        "all tokens"
    )


def _per_step(logits_at, final: torch.Tensor, last: np.ndarray, n_slots: int, top_k: int) -> dict[str, np.ndarray]:
    """The lens measures step by step, [T, V] at a time, the previous step's log-probabilities kept for its KL."""
    final_logp = torch.log_softmax(final.double(), dim=-1)
    target = final_logp.argmax(-1)
    steps, previous = [], None
    for step in range(n_slots):
        logp = torch.log_softmax(logits_at(step).double(), dim=-1)
        steps.append(step_measures(logp, final_logp, previous, target, top_k))
        previous = logp
    return stack_steps(steps)
