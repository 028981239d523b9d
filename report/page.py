"""The report's one HTML file: the page template, its style and script, plotly.js and the data, all inlined.

Nothing is fetched when the page opens (no CDN, no server), so a report mailed or archived beside a paper still
works offline. Plotly draws the figures: its heatmap has hover labels and click events built in, and its one
JavaScript file inlines whole, where Bokeh would need its Python document model to build the same callbacks.
"""

from __future__ import annotations

import base64
import json
import os
import re
from importlib import resources

import numpy as np

from .._version import __version__
from ..storage import safety

WINDOW = 256  # tokens drawn at full resolution at once
OVERVIEW_ROWS = 1000  # rows of a long run's overview at most (each a block of tokens)
ASSETS = resources.files(__package__) / "assets"


def render(runs: list[dict], *, title: str, source: str, notes: list[str]) -> str:
    """The page for ``runs`` (``data.packed`` views, each with its own step axis): a self-contained HTML document as
    text."""
    from plotly.offline import get_plotlyjs

    data = {
        "title": title,
        "source": source,
        "notes": notes,
        "window": WINDOW,
        "overview_rows": OVERVIEW_ROWS,
        "runs": runs,
    }
    parts = {
        "__VERSION__": __version__,
        "__TITLE__": _html_text(title),
        "__STYLE__": _asset("report.css"),
        "__PLOTLY__": _script(get_plotlyjs()),
        "__DATA__": _json(data),
        "__SCRIPT__": _script(_asset("report.js")),
    }
    template = _asset("report.html")
    placeholders = re.compile("|".join(re.escape(name) for name in parts))
    assert sorted(placeholders.findall(template)) == sorted(parts), "each placeholder once in report.html"
    # one pass: inlined text (a token reading __SCRIPT__, a capture named __DATA__.h5) is never searched again
    return placeholders.sub(lambda found: parts[found.group()], template)


def page_data(path: str | os.PathLike) -> dict:
    """The data a written report holds, as its page reads it (a tool, or a test, reading the numbers back)."""
    with open(path, encoding="utf-8") as f:
        found = re.search(r'<script type="application/json" id="loopscope-data">(.*?)</script>', f.read(), re.S)
    if found is None:
        raise ValueError(f"{path} is not a loopscope report (no data element)")
    return json.loads(found.group(1))


def unpacked(packed: dict) -> np.ndarray:
    """An array of :func:`page_data` (``{"dtype", "shape", "b64"}``) as numpy."""
    data = base64.b64decode(packed["b64"])
    return np.frombuffer(data, dtype=np.dtype(packed["dtype"]).newbyteorder("<")).reshape(packed["shape"])


def _asset(name: str) -> str:
    return (ASSETS / name).read_text(encoding="utf-8")


def _json(data: dict) -> str:
    """JSON safe inside a script element: a token reading ``</script>`` cannot end it early (``<`` is escaped)."""
    text = readable(json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False))
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _script(code: str) -> str:
    if "</script" in code.lower():
        raise ValueError("inlined script holds '</script'")  # a library release that did would break the page
    return code


def _html_text(text: str) -> str:
    import html

    return html.escape(readable(text), quote=True)


def readable(text: str) -> str:
    """``text`` as valid UTF-8 can hold it, as the capture's reader shows token text: a lone surrogate (a raw byte
    from a tokenizer, or from a file name) becomes U+FFFD instead of failing the page's write."""
    return safety.utf8(text).decode("utf-8", "replace")
