"""A Python script run in a child process, as the hostile-file tests do: a crash, a hang or a memory blow-up there
fails one test instead of the suite."""

from __future__ import annotations

import os
import subprocess
import sys


def run_script(
    script: str, *args, timeout: float, columns: int = 200, env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -c script args``; rich's width fixed so one line stays one line;
    ``env`` added to this process's environment."""
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")},
        **(env or {}),
    }
    env["COLUMNS"] = str(columns)
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, timeout=timeout, env=env
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
