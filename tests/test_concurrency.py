"""Several processes appending to one capture at once: every run is kept, under its own number.

Real processes, started together behind a barrier, on one capture file (a second job started on the same study
file). Before run numbers were reserved on disk, both writers took the same numbers and renamed their run files
over each other's, silently.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import h5py
import numpy as np

import loopscope

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import loopscope
    from loopscope.models.huginn_reference import RavenReferenceForCausalLM, register, tiny_config
    register(); torch.manual_seed(0)
    model = RavenReferenceForCausalLM(tiny_config()).eval()
    path, writer, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    while time.time() < start:  # every writer attaches at the same moment
        time.sleep(0.001)
    with loopscope.attach(model, path, mode="a"), torch.no_grad():
        for i in range(RUNS):
            # the first token id names the writer, the step count the run: each run is recognisable afterwards
            model(torch.tensor([[100 + writer, 5, 6, 7]]), num_steps=i + 1)
    print("DONE", flush=True)
    """
)


def test_writers_appending_at_once_keep_every_run_under_distinct_numbers(tmp_path):
    import time

    path, writers, runs = tmp_path / "study.h5", 4, 6
    start = time.time() + 8  # imports take a few seconds on a loaded machine
    children = [
        subprocess.Popen(
            [sys.executable, "-c", f"RUNS = {runs}\n" + WRITER, str(path), str(w), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    for child in children:
        out, err = child.communicate(timeout=240)
        assert child.returncode == 0 and "DONE" in out, err
    with loopscope.open(path) as capture:
        found = sorted((int(r.token_ids[0]) - 100, int(r.num_steps[0])) for r in capture.runs)
        numbers = [r.index for r in capture.runs]
        for run in capture.runs:
            assert not np.isnan(run.states()).any()
        assert not capture.incomplete_runs
    assert found == sorted((w, i + 1) for w in range(writers) for i in range(runs))
    assert len(set(numbers)) == writers * runs
    with h5py.File(path) as index:  # each writer's close linked its runs without dropping the others'
        assert sorted(index["runs"]) == sorted(f"{n:06d}" for n in numbers)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_reserved_numbers_skip_runs_on_disk_and_partial_files(tmp_path):
    """A writer that attached earlier keeps counting from its own next number; where another process has taken
    that number (finished or still partial), it moves past everything on disk."""
    from loopscope.storage import run_files

    index = str(tmp_path / "c.h5")
    (tmp_path / "c.h5.runs").mkdir()
    first, second = run_files.RunFiles(index), run_files.RunFiles(index)
    a = first.create_run(0)
    b = second.create_run(0)  # both start at 0; the second finds 000000.partial.h5 taken
    assert (first.number_of(0), second.number_of(0)) == (0, 1)
    first.finish_run(0, a, complete=True)
    c = first.create_run(1)  # first's next is 1, held by second: it moves past
    assert first.number_of(1) == 2
    second.finish_run(0, b, complete=True)
    first.finish_run(1, c, complete=False)
    assert sorted(p.name for p in (tmp_path / "c.h5.runs").iterdir()) == ["000000.h5", "000001.h5", "000002.partial.h5"]
