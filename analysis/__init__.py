"""Offline analysis of capture files (no torch import needed): s*, per-token measures, PCA, figures."""

from .metrics import METRICS, TokenMetrics, convergence, step_profile, token_metrics
from .pca import TrajectoryPCA, trajectory_pca

__all__ = [
    "METRICS",
    "TokenMetrics",
    "TrajectoryPCA",
    "convergence",
    "figures",
    "lens",
    "step_profile",
    "token_metrics",
    "trajectory_pca",
]


def __getattr__(name):
    # matplotlib is slow to import: the figures module loads on first use. The readout lens needs torch: also on
    # first use, so ``import loopscope.analysis`` stays torch-free.
    if name == "figures":
        import importlib

        return importlib.import_module(".figures", __name__)
    if name == "lens":
        from .readout_lens import lens

        return lens
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
