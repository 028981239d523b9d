"""The interactive report: one self-contained HTML file to explore a capture in a browser (``loopscope report``)."""

from .build import write_report

__all__ = ["write_report"]
