"""Offline analysis of capture files (no torch import needed)."""

from .convergence import convergence

__all__ = ["convergence", "heatmap"]


def heatmap(*args, **kwargs):
    """See :func:`loopscope.analysis.figures.heatmap` (imported lazily: matplotlib is slow to import)."""
    from .figures import heatmap as _heatmap

    return _heatmap(*args, **kwargs)
