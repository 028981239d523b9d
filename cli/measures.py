"""The per-token measures a command needs, computed with a progress bar and a warning about non-finite states.

Reading the states is the slow part of plot and convergence; both show the same bar and the same warning.
"""

from __future__ import annotations

from ..analysis.metrics import METRICS, token_metrics
from .output import console, progress, warn_nonfinite


def run_metrics(run, reference, space, loop, measures=METRICS):
    """The measures of ``run`` a command needs (each costs arithmetic), with a progress bar while the states
    stream in."""
    with progress(f"run {run.index}: reading states", max(run.num_tokens, 1)) as advance:
        metrics = token_metrics(run, reference, space, loop=loop, progress=advance, measures=measures)
    warn_nonfinite(metrics)
    return metrics


def dask_metrics(file, runs, reference, space, loop, scheduler, workers, missing: str = "error") -> list:
    """Every selected run's measures in one Dask computation (see analysis/distributed.py)."""
    from ..analysis.distributed import token_metrics as distributed_token_metrics
    from ..analysis.reference import parse_reference

    with console.status(f"computing on Dask ({scheduler or 'threads'})…"):
        results = distributed_token_metrics(
            file,
            runs=runs,
            reference=parse_reference(reference),
            space=space,
            loop=loop,
            scheduler=scheduler,
            workers=workers,
            missing=missing,
        )
    for metrics in results:
        warn_nonfinite(metrics)
    return results
