"""The writer of ``writer_placement.py``: the same function runs in a thread of the benchmark's process and, as
this script, in a child process (which imports numpy and h5py only, never torch).

    python benchmarks/_placement_writer.py '[states_path, shape, folder, idle, hot]'   # forwards' numbers on stdin
"""

from __future__ import annotations

import json
import os
import sys
import time

import h5py
import numpy as np


def write_forward(buffer: np.ndarray, f: int, folder: str, hot: bool = False, steps_per_chunk: int = 4) -> None:
    """The run files of forward ``f`` (one per batch row): ``buffer`` is [forwards, steps, batch, tokens, hidden].
    ``hot``: write a block the writer has just filled itself instead of the states (nothing read cold)."""
    states = buffer[f]
    for b in range(states.shape[1]):
        with h5py.File(os.path.join(folder, f"run-{f}-{b}.h5"), "w") as out:
            for k in range(15):
                out.attrs[f"attribute_{k}"] = k
            if hot:
                block = np.full(states[:, b].shape, f, np.float32)
            else:
                block = np.ascontiguousarray(states[:, b])  # [steps, tokens, hidden], read cold
            out.create_dataset("states", data=block, chunks=(steps_per_chunk, *block.shape[1:]), fletcher32=True)
            for k in range(5):
                out.create_dataset(f"per_token_{k}", data=np.arange(block.shape[1]), chunks=True, fletcher32=True)


def serve(path: str, shape: tuple[int, ...], folder: str, idle: bool, hot: bool) -> None:
    """Write each forward named on stdin; at its end print this process's CPU seconds."""
    if idle:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    buffer = np.memmap(path, np.float32, "r", shape=shape)
    for line in sys.stdin:
        write_forward(buffer, int(line), folder, hot)
    del buffer
    print(time.process_time(), flush=True)


if __name__ == "__main__":
    states_path, states_shape, out_folder, at_idle, write_hot = json.loads(sys.argv[1])
    serve(states_path, tuple(states_shape), out_folder, at_idle, write_hot)
