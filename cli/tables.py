"""The per-run rows of the tables ``info`` and ``convergence`` print: one summary line that tells runs apart.

Kept out of the commands so that they stay parse, call, print; every cell is safe text, ready for rich.
"""

from __future__ import annotations

import numpy as np

from ..storage import schema
from ..storage.display import steps_text
from .output import text

INFO_COLUMNS = ("run", "call", "tokens", "steps (min-max)", "loops", "dtype", "hidden", "signals")
DAMAGED_ROW = ("[red]damaged[/red]", "-", "-", "-", "-", "-", "-")
CONVERGENCE_COLUMNS = ("run", "tokens", "steps", "converged at (median)", "never converged", "last step delta (mean)")


def info_row(run) -> tuple:
    """The cells after the run index in ``info``; raises LoopscopeError when the run file is damaged, or when any
    loop's states could not be read (a virtual dataset that maps itself, a merged run's source gone)."""
    run.check()
    return tuple(
        text(cell)
        for cell in (
            schema.text_or(run.attrs.get("call"), "?"),  # text, whatever a damaged attribute holds
            str(run.num_tokens),
            steps_text(run),  # HRM's H and L, ALBERT's groups: each loop its own range
            ",".join(run.loops),
            run.logical_dtype() if run.loops else "-",
            str(run.hidden_size()) if run.loops else "-",
            ",".join(n for loop in run.loops for n in run.signal_names(loop)) or "-",
        )
    )


def convergence_row(run, m, tol: float) -> tuple:
    """The ``convergence`` summary of one run's measures ``m``, in iterations as the CSV and ``info`` count them (with
    a step stride, the last step delta is between the last two stored steps): the CSV holds the detail."""
    converged = m.convergence_iterations(tol)
    done = converged[converged >= 0]
    last = m.step_delta[np.arange(len(m.num_steps)), m.num_steps] if len(m.num_steps) else np.array([])
    last = last[np.isfinite(last)]
    iterations = m.num_steps if m.iterations is None else m.iterations
    kept = f" (1 in {m.step_stride} kept)" if m.step_stride > 1 else ""
    return (
        str(run.index),
        str(run.num_tokens),
        f"{iterations.min()}-{iterations.max()}{kept}" if run.num_tokens else "-",
        f"{np.median(done):g}" if done.size else "-",
        str(int(np.sum(converged < 0))),
        f"{last.mean():.3g}" if last.size else "-",
    )
