"""The arithmetic of the readout lens, shared by the logit and the coda lens: one step's distribution measured
against the token's last step and its previous one. Float64 log-probabilities, entropies and KL divergences, so a
KL of 1e-7 near convergence keeps its digits."""

from __future__ import annotations

import numpy as np
import torch

from ..storage.reader import Run
from .lens_result import LensResult


def step_measures(
    logp: torch.Tensor, final: torch.Tensor, previous: torch.Tensor | None, target: torch.Tensor, top_k: int
) -> dict[str, np.ndarray]:
    """Measures of one step for a batch of tokens: ``logp`` [b, V] float64 log-probabilities at this step, ``final``
    and ``previous`` [b, V] at the token's last step and at the step before (None at step 0), ``target`` [b] the
    last step's top-1 token."""
    p = logp.exp()

    def kl(to: torch.Tensor) -> np.ndarray:  # KL(p || exp(to)), with 0 log 0 = 0
        return torch.where(p > 0, p * (logp - to), 0.0).sum(-1).numpy()

    values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    target_logp = logp.gather(-1, target[:, None])
    return {
        "top_ids": ids.numpy(),
        "top_probs": values.exp().numpy(),
        "entropy": (-torch.where(p > 0, p * logp, 0.0).sum(-1)).numpy(),
        "kl_final": kl(final),
        "kl_previous": kl(previous) if previous is not None else np.full(len(target), np.nan),
        "final_rank": (logp > target_logp).sum(-1).numpy(),  # tokens strictly more probable than the target
        "final_prob": target_logp[:, 0].exp().numpy(),
    }


def stack_steps(steps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-step measures [b, ...] -> [b, K, ...]."""
    return {name: np.stack([step[name] for step in steps], axis=1) for name in steps[0]}


def measure(logits: torch.Tensor, last: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Every lens measure of a block: ``logits`` [b, K, V] float32, ``last`` [b] each token's last step. Steps past
    a token's last are left for :func:`assemble` to blank."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    final = logp[torch.arange(len(last)), torch.as_tensor(last, dtype=torch.long)]
    target = final.argmax(-1)
    return stack_steps(
        [step_measures(logp[:, k], final, logp[:, k - 1] if k else None, target, top_k) for k in range(logp.shape[1])]
    )


def assemble(run: Run, loop: str, kind: str, parts: dict[str, np.ndarray], last: np.ndarray) -> LensResult:
    """A LensResult from measures over every token, blanked past each token's last step."""
    past = np.arange(parts["entropy"].shape[1])[None, :] > last[:, None]
    for value in parts.values():
        value[past] = -1 if value.dtype.kind in "iu" else np.nan
    iterations = run.step_iterations(loop)
    steps = iterations.max(axis=0) if iterations.size else np.zeros(parts["entropy"].shape[1], dtype=np.int64)
    return LensResult(
        kind=kind,
        loop=loop,
        run_index=run.index,
        steps=steps,
        last=last,
        top_ids=parts["top_ids"],
        top_probs=parts["top_probs"],
        entropy=parts["entropy"],
        kl_final=parts["kl_final"],
        kl_previous=parts["kl_previous"],
        final_rank=parts["final_rank"],
        final_prob=parts["final_prob"],
    )
