"""The package's own Python files, for tests that read the source: the checkout is the package, and a virtual
environment made inside it (README's commands run in one, named ``.venv``, ``venv`` or anything else) or build
output there holds thousands of files that are not loopscope's."""

from __future__ import annotations

from pathlib import Path

NOT_SOURCE = ("build", "dist", "site-packages", "__pycache__")


def package_sources(root: Path) -> list[Path]:
    """Every ``*.py`` under ``root``, sorted, leaving out hidden folders (``.git``, ``.venv``, ``.ci-venv``), any
    folder holding a ``pyvenv.cfg`` (a virtual environment, whatever its name) and build output."""
    environments = {cfg.parent for cfg in root.rglob("pyvenv.cfg")}
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        folders = relative.parts[:-1]
        if any(part.startswith(".") or part in NOT_SOURCE for part in folders):
            continue
        if any(root.joinpath(*folders[: i + 1]) in environments for i in range(len(folders))):
            continue
        found.append(path)
    return found
