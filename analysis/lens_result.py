"""What every stored step of a run would predict: the result of the readout lens (``lens.py``), without torch.

Per token t and stored step k (slot k of the states, ``iterations[t, k]`` its iteration): the top-k next-token ids and
probabilities, the entropy, KL(p_k || p_final) (the quantity Huginn's ``kl`` exit criterion thresholds),
KL(p_k || p_(k-1)), and the rank and probability of the token the last step predicts. Per token, the *settling
step*: the first stored step from which the top-1 prediction never changes again. Slots past a token's last step
are NaN (floats) or -1 (ids, ranks); so are steps read out from a NaN or infinite state, which predict nothing (the
CSV leaves their cells empty; a token whose last step is one never settles).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from ..errors import LoopscopeError

#: The lenses: ``logit`` reads each state out through the final norm and the head; ``coda`` runs it through the
#: layers after the loop first (Huginn's coda), as the model does with its last state.
KINDS = ("logit", "coda")

CSV_COLUMNS = (
    "run",
    "loop",
    "kind",
    "token_index",
    "position",
    "token",
    "step",
    "iteration",
    "top1_id",
    "top1_text",
    "top1_prob",
    "entropy",
    "kl_to_final",
    "kl_to_previous",
    "final_token_rank",
    "final_token_prob",
    "settled",
    "topk_ids",  # the top_k most probable next tokens, most probable first, separated by spaces
    "topk_probs",
)


@dataclass
class LensResult:
    """The lens of one run and loop; arrays are [T, K] (or [T, K, top_k]) over tokens and stored steps."""

    kind: str
    loop: str
    run_index: int
    steps: np.ndarray  # [K] the iteration of each stored step, where every token's is the same (see iterations)
    last: np.ndarray  # [T] each token's last stored step
    top_ids: np.ndarray  # [T, K, top_k] int64, most probable first
    top_probs: np.ndarray  # [T, K, top_k] float64
    entropy: np.ndarray  # [T, K] nats
    kl_final: np.ndarray  # [T, K] KL(p_k || p_last) in nats
    kl_previous: np.ndarray  # [T, K] KL(p_k || p_(k-1)) in nats, NaN at step 0
    final_rank: np.ndarray  # [T, K] int64: rank under p_k of the last step's top-1 token (0 = it leads)
    final_prob: np.ndarray  # [T, K] its probability under p_k
    tokens: list[str] | None = None  # each row's own token text, when the capture stored it
    positions: np.ndarray | None = None  # [T] each row's position in its sequence
    top1_text: np.ndarray | None = None  # [T, K] object: the text of each top-1 prediction (with a tokenizer)
    # [T, K] each token's own iteration per stored step (-1 past its last): with a step stride and adaptive exit,
    # a token that stopped early holds its last iteration in a slot where the others hold a later stride's
    iterations: np.ndarray | None = None
    step_stride: int = 1  # 1, or n when the capture kept s0, every n-th iteration and each token's last

    @property
    def step_iterations(self) -> np.ndarray:
        """[T, K] int64: the iteration each token's stored step holds (``steps`` for every token when not given)."""
        if self.iterations is not None:
            return np.asarray(self.iterations, dtype=np.int64)
        return np.broadcast_to(np.asarray(self.steps, dtype=np.int64), self.entropy.shape)

    @property
    def shared_steps(self) -> np.ndarray | None:
        """[K] the iteration of each stored step when every token that reached it holds the same one (an axis to
        label in iterations), else None (a step stride with adaptive exit: the axis is in stored steps)."""
        held = self.step_iterations
        reached = held >= 0
        top = np.where(reached, held, -1).max(axis=0, initial=-1)
        if np.any(reached & (held != top[None, :])):
            return None
        return np.where(top >= 0, top, np.asarray(self.steps, dtype=np.int64)[: len(top)])

    @property
    def num_tokens(self) -> int:
        return int(self.top_ids.shape[0])

    @property
    def top1(self) -> np.ndarray:
        """[T, K] int64: the most probable next token at each step (-1 past a token's last step)."""
        return self.top_ids[..., 0]

    @property
    def run(self) -> int:
        """The run's index, as :class:`~loopscope.analysis.metrics.TokenMetrics` names it (for warnings)."""
        return self.run_index

    @property
    def nonfinite_steps(self) -> np.ndarray:
        """[T, K] bool: steps a token ran whose state was NaN or infinite (no prediction: top-1 id -1)."""
        ran = np.arange(self.top_ids.shape[1])[None, :] <= np.asarray(self.last)[:, None]
        return ran & (self.top1 < 0)

    def nonfinite_tokens(self) -> np.ndarray:
        """Indices of tokens with a NaN or infinite state at a step they ran."""
        return np.nonzero(self.nonfinite_steps.any(axis=1))[0]

    @property
    def settling(self) -> np.ndarray:
        """[T] int64: the first stored step from which the top-1 token stays the last step's top-1; a step without
        a prediction (NaN state) never counts as settled, and a token whose last step has none never settles
        (its last step + 1)."""
        top1, last = self.top1, self.last
        out = np.zeros(len(last), dtype=np.int64)
        for t, end in enumerate(last):
            changed = np.flatnonzero((top1[t, : end + 1] != top1[t, end]) | (top1[t, : end + 1] < 0))
            out[t] = changed[-1] + 1 if changed.size else 0
        return out

    @property
    def settling_iteration(self) -> np.ndarray:
        """[T] int64: :attr:`settling` as an iteration of the loop (differs from it with ``step_stride``), each
        token's own; -1 for a token that never settles."""
        settling, last = self.settling, np.asarray(self.last)
        rows = np.arange(self.num_tokens)
        held = self.step_iterations[rows, np.minimum(settling, last)]
        return np.where(settling > last, -1, held)

    def to_csv(self, path: str | os.PathLike, *, append: bool = False) -> int:
        """One row per token and stored step it ran (``CSV_COLUMNS``); returns the rows written."""
        settling, iterations = self.settling, self.step_iterations
        rows = 0
        try:
            # UTF-8 whatever the locale; a lone surrogate (a tokenizer decoding half a character) becomes "?"
            with open(path, "a" if append else "w", newline="", encoding="utf-8", errors="replace") as handle:
                writer = csv.writer(handle)
                if not append or os.path.getsize(path) == 0:
                    writer.writerow(CSV_COLUMNS)
                for t in range(self.num_tokens):
                    for k in range(int(self.last[t]) + 1):
                        writer.writerow(self._row(t, k, settling[t], int(iterations[t, k])))
                        rows += 1
        except OSError as exc:
            raise LoopscopeError(f"cannot write {path}: {exc.strerror or exc}") from None
        return rows

    def _row(self, t: int, k: int, settling: int, iteration: int) -> list:
        text = "" if self.tokens is None else self.tokens[t]
        predicted = "" if self.top1_text is None else str(self.top1_text[t, k])
        position = t if self.positions is None else int(self.positions[t])
        if self.top_ids[t, k, 0] < 0:  # a NaN or infinite state: no prediction, no rank, not settled
            return [self.run_index, self.loop, self.kind, t, position, text, k, iteration, *[""] * 11]
        return [
            self.run_index,
            self.loop,
            self.kind,
            t,
            position,
            text,
            k,
            iteration,
            int(self.top_ids[t, k, 0]),
            predicted,
            _number(self.top_probs[t, k, 0]),
            _number(self.entropy[t, k]),
            _number(self.kl_final[t, k]),
            _number(self.kl_previous[t, k]),
            "" if self.final_rank[t, k] < 0 else int(self.final_rank[t, k]),
            _number(self.final_prob[t, k]),
            int(k >= settling),
            " ".join(str(int(i)) for i in self.top_ids[t, k]),
            " ".join(_number(p) for p in self.top_probs[t, k]),
        ]


def _number(value: float) -> str:
    return "" if not np.isfinite(value) else f"{float(value):.9g}"
