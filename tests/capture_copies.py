"""Copies of a real capture for tests that damage them: the index and its run folder, side by side."""

from __future__ import annotations

import shutil
from pathlib import Path


def copy_capture(source: Path, folder: Path, name: str | None = None) -> Path:
    """``source`` (an index with its ``.runs`` folder) copied into ``folder`` (made if missing) as ``name``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / (name or source.name)
    shutil.copyfile(source, target)
    shutil.copytree(str(source) + ".runs", str(target) + ".runs")
    return target
