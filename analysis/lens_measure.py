"""The arithmetic of the readout lens, shared by the logit and the coda lens: one step's distribution measured
against the token's last step and its previous one. Float64 log-probabilities, entropies and KL divergences, so a
KL of 1e-7 near convergence keeps its digits."""

from __future__ import annotations

import numpy as np
import torch

from ..storage.reader import Run
from .lens_result import LensResult

#: The measures' key for [b, K] flags of steps read out from a NaN or infinite state (NaN log-probabilities): their
#: top-k ids and ranks would be arbitrary, so :func:`assemble` blanks them.
NONFINITE = "nonfinite"

#: Float64 log-probabilities measured at a time (a token or a few): small enough to stay in cache between passes.
SUB_BYTES = 4 << 20


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
        NONFINITE: torch.isnan(logp).any(-1).numpy(),
    }


def stack_steps(steps: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-step measures [b, ...] -> [b, K, ...]."""
    return {name: np.stack([step[name] for step in steps], axis=1) for name in steps[0]}


def measure(logits: torch.Tensor, last: np.ndarray, top_k: int) -> dict[str, np.ndarray]:
    """Every lens measure of a block: ``logits`` [b, K, V] float32, ``last`` [b] each token's last step. Steps past
    a token's last are left for :func:`assemble` to blank.

    A few tokens at a time (``SUB_BYTES`` of float64 log-probabilities, so they stay in cache between passes), and
    the entropy and both KL divergences of all steps from one matrix product per token: with G = p log p^T [K, K],
    H(p_k) = -G[k, k] and KL(p_k || p_j) = G[k, k] - G[k, j]. Exactly 0 at the last step; a KL of 1e-9 keeps
    ~1e-15 absolute. A token whose logits hold -inf (a masked vocabulary: 0 log 0) goes step by step instead."""
    n_tokens, n_steps, vocab = logits.shape
    per = max(1, SUB_BYTES // max(n_steps * vocab * 8, 1))
    pieces = []
    for t0 in range(0, n_tokens, per):
        logp = torch.log_softmax(logits[t0 : t0 + per].double(), dim=-1)
        ends = torch.as_tensor(last[t0 : t0 + per], dtype=torch.long)
        if torch.isinf(logp).any():
            pieces.append(_stepwise(logp, ends, top_k))
        else:
            pieces.append(_fused(logp, ends, top_k))
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def _fused(logp: torch.Tensor, last: torch.Tensor, top_k: int) -> dict[str, np.ndarray]:
    rows = torch.arange(len(last))
    p = logp.exp()
    g = torch.bmm(p, logp.transpose(1, 2))  # [b, K, K]: g[k, j] = sum_v p_k log p_j
    own = g.diagonal(dim1=1, dim2=2)  # -H(p_k)
    kl_final = (own - g[rows, :, last]).clamp_min(0)
    kl_previous = torch.full_like(own, float("nan"))
    kl_previous[:, 1:] = (own[:, 1:] - g.diagonal(offset=-1, dim1=1, dim2=2)).clamp_min(0)
    values, ids = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
    target = logp[rows, last].argmax(-1)
    target_logp = logp.gather(-1, target[:, None, None].expand(-1, logp.shape[1], 1))
    return {
        "top_ids": ids.numpy(),
        "top_probs": values.exp().numpy(),
        "entropy": (-own).numpy(),
        "kl_final": kl_final.numpy(),
        "kl_previous": kl_previous.numpy(),
        "final_rank": (logp > target_logp).sum(-1).numpy(),  # tokens strictly more probable than the target
        "final_prob": target_logp[..., 0].exp().numpy(),
        NONFINITE: torch.isnan(logp).any(-1).numpy(),
    }


def _stepwise(logp: torch.Tensor, last: torch.Tensor, top_k: int) -> dict[str, np.ndarray]:
    final = logp[torch.arange(len(last)), last]
    target = final.argmax(-1)
    return stack_steps(
        [step_measures(logp[:, k], final, logp[:, k - 1] if k else None, target, top_k) for k in range(logp.shape[1])]
    )


def assemble(run: Run, loop: str, kind: str, parts: dict[str, np.ndarray], last: np.ndarray) -> LensResult:
    """A LensResult from measures over every token, blanked past each token's last step and at steps from a NaN or
    infinite state (no prediction: ids and ranks -1, the rest NaN). A token whose last step is such has no final
    prediction to compare with: its ranks, final-token probabilities and KL to the last step are blank throughout."""
    past = np.arange(parts["entropy"].shape[1])[None, :] > last[:, None]
    blown = np.asarray(parts.pop(NONFINITE, np.zeros_like(past)), dtype=bool) & ~past
    no_final = blown[np.arange(len(last)), last] if len(last) else np.zeros(0, dtype=bool)
    blank = past | blown  # every measure's; some measures blank more
    more = {name: no_final[:, None] for name in ("final_rank", "final_prob", "kl_final")}
    more["kl_previous"] = np.pad(blown[:, :-1], ((0, 0), (1, 0)))  # against a blank previous step
    for name, value in parts.items():
        value[blank | more[name] if name in more else blank] = -1 if value.dtype.kind in "iu" else np.nan
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
        iterations=iterations,
        step_stride=run.step_stride,
    )
