"""Jupyter: the convergence heatmap drawn inline under a run's HTML summary (``Run._repr_html_``).

``storage/display.py`` writes the summaries but cannot draw (storage sits below analysis, which imports it), so it
keeps a registry of figure functions; this module, above both, registers :func:`inline_heatmap` there, and
``import loopscope`` imports this module: ``loopscope.open(path).runs[0]`` in a notebook shows the heatmap with
nothing else to do. Registering costs nothing: numpy, matplotlib and the analysis load when a run is first drawn.
``display.unregister_run_figure(inline_heatmap)`` turns it off.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

from .storage import display

if TYPE_CHECKING:
    import numpy as np

    from .storage.run import Run

MAX_TOKENS = 256  # rows drawn inline: the first tokens of a longer run (the note under the figure says so)
BLOCK_BYTES = 32 << 20  # stored states read at a time for them


@display.register_run_figure
def inline_heatmap(run: Run) -> str:
    """``loopscope plot``'s default heatmap of ``run`` (s* = each token's final state, the readout space where the
    capture stored a norm, the primary loop) for its first :data:`MAX_TOKENS` tokens, as a PNG inside an ``<img>``,
    with a line naming the loop drawn and the tokens left out. Raises on a run it cannot read or draw (the summary
    shows a one-line note instead)."""
    import base64
    import html

    from .analysis.figure_axes import space_text

    loops = run.loops
    if not loops or run.num_tokens == 0:
        return _caption("no loop iterations recorded: no heatmap")
    loop, count = loops[0], min(run.num_tokens, MAX_TOKENS)
    distances, space = _distances(run, loop, count)
    png = _png(run, distances, space, loop if len(loops) > 1 else None)
    notes = [f"convergence heatmap, s* = final, {space_text(space, run.capture.readout.kind)}"]
    if len(loops) > 1:
        notes.append(f"loop {loop} drawn (this run has loops {', '.join(loops)}; convergence(run, loop={loops[1]!r}))")
    if count < run.num_tokens:
        notes.append(f"first {count} of {run.num_tokens} tokens drawn (loopscope plot FILE --run {run.index}: all)")
    image = base64.b64encode(png).decode("ascii")
    alt = html.escape(f"convergence heatmap of run {run.index}")
    return f'{_caption("; ".join(notes))}<img src="data:image/png;base64,{image}" alt="{alt}" style="max-width:100%">'


def _caption(text: str) -> str:
    import html

    return f'<p style="{display.STYLE}"><em>{html.escape(text)}</em></p>'


def _distances(run: Run, loop: str, count: int) -> tuple[np.ndarray, str]:
    """[count, K] ||f(s_k) - f(s_last)|| of the first ``count`` tokens, read ``BLOCK_BYTES`` of states at a time
    (the whole run is never read for a glance at its start), with the arithmetic of the streamed analysis."""
    import numpy as np

    from .analysis.measures import stored_block_measures
    from .analysis.reference import resolve_space, space_fn

    space = resolve_space(run, "auto")
    to_space = space_fn(run, space)
    last = run.steps_of(loop)[:count].astype(np.int64)
    ds = run.dataset(loop)
    block = max(1, BLOCK_BYTES // max(ds.shape[1] * ds.shape[2] * ds.dtype.itemsize, 1))
    parts = []
    for t0 in range(0, count, block):
        t1 = min(t0 + block, count)
        stored = run.decode(run.read(np.s_[t0:t1], loop), loop)
        parts.append(stored_block_measures(stored, last[t0:t1], None, to_space, ("distance",))["distance"])
    return np.concatenate(parts)[:, : int(last.max()) + 1], space


def _png(run: Run, distances: np.ndarray, space: str, loop: str | None) -> bytes:
    """The heatmap ``loopscope plot`` draws (``figures.heatmap``, zeros clipped), one page, as PNG bytes."""
    import tempfile
    from pathlib import Path

    from .analysis.figure_axes import prompt_rows
    from .analysis.figures import heatmap

    count = len(distances)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a glyph the font lacks is not worth a warning under a summary
        (path,) = heatmap(
            distances,
            Path(folder) / "heatmap.png",
            tokens=run.tokens[:count] if run.tokens is not None else None,
            positions=run.positions[:count],
            title=f"{os.path.basename(run.capture.path)}, run {run.index}: convergence of the latent state",
            space=space,
            rows_per_page=max(count, 1),
            step_stride=run.step_stride,
            readout=run.capture.readout.kind,
            loop=loop,
            prompt=prompt_rows(run),
        )
        return Path(path).read_bytes()
