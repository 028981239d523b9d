"""The files read with the common HDF5 tools, and their text is UTF-8.

Every file of a capture (index and run files, plain, merged and of several loops) is dumped with the real ``h5dump``
and ``h5ls`` (HDF5 1.10 on, as Debian and Ubuntu ship them in ``hdf5-tools``): no errors, the run attributes are
there, and strings are marked UTF-8. Without the tools these tests skip; with ``LOOPSCOPE_REQUIRE_TOOLS=1`` (CI) a
missing tool is a failure. Non-ASCII text (accents, CJK, emoji) round-trips through the reader, merge, export and
verify, and captures written before (ASCII-marked strings, HDF5's newest object versions) still read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import zipfile

import h5py
import numpy as np
import pytest
import torch

import loopscope
from loopscope.storage import export, merge, run_files, schema, verify

NAME = "modèles/日本語-🙂"
TEXTS = ("é", "日本", "🙂", "naïve", "Ж", "e\u0301")
DATA_LINE = re.compile(r"^\s*\(\d+(,\d+)*\):")  # h5dump's data rows: a file's own text may say anything


class NonAsciiTokenizer:
    """Decodes every token id to non-ASCII text (an accent, CJK, an emoji, Cyrillic, a combining mark)."""

    def decode(self, ids):
        return "".join(TEXTS[int(i) % len(TEXTS)] for i in ids)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("LOOPSCOPE_REQUIRE_TOOLS") == "1":
            pytest.fail(f"{name} is not on PATH; LOOPSCOPE_REQUIRE_TOOLS=1 needs it (apt-get install hdf5-tools)")
        pytest.skip(f"{name} is not on PATH (apt-get install hdf5-tools)")
    return path


def _run(tool: str, *args) -> str:
    """The tool's output; it must exit 0 and print no error outside the data it dumps."""
    command = [_tool(tool), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not result.stderr.strip(), output
    noise = [line for line in output.splitlines() if "error" in line.lower() and not DATA_LINE.match(line)]
    assert not noise, "\n".join(noise)
    return output


def _files(index) -> list:
    return [index, *(path for path, _ in run_files.list_run_files(str(index)).values())]


def _capture(model, path, tokenizer=None):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with loopscope.attach(model, path, tokenizer=tokenizer):
        with torch.no_grad():
            model(ids)
        model.generate(ids, max_new_tokens=3, do_sample=False)
    return path


@pytest.fixture(scope="module")
def captures(tmp_path_factory, new_reference_model):
    """{kind: index path}: two captures with non-ASCII tokens and model name, and their merge."""
    folder = tmp_path_factory.mktemp("tools")
    model = new_reference_model()
    model.config.name_or_path = NAME
    found = {
        "plain": _capture(model, folder / "a.h5", NonAsciiTokenizer()),
        "other": _capture(model, folder / "b.h5", NonAsciiTokenizer()),
    }
    merge.merge(folder / "merged.h5", [found["plain"], found["other"]])
    found["merged"] = folder / "merged.h5"
    return found


def _assert_tools_read(index, kind: str) -> None:
    for path in _files(index):
        attrs = _run("h5dump", "-A", path)
        headers = _run("h5dump", "-H", path)
        listing = _run("h5ls", "-v", "-r", path)
        assert "*ERROR*" not in listing
        assert 'ATTRIBUTE "format"' in attrs and "CSET H5T_CSET_UTF8" in attrs
        assert "H5T_CSET_ASCII" not in attrs + headers
        if path == index:
            assert '"loopscope-capture"' in attrs
            for name in ("format_version", "config_json", "loops_json", "model_class", "name_or_path"):
                assert f'ATTRIBUTE "{name}"' in attrs, (kind, name)
        else:
            assert '"loopscope-run"' in attrs
            for name in ("run_number", "call", "complete", "n_tokens", "step_stride"):
                assert f'ATTRIBUTE "{name}"' in attrs, (kind, path, name)
            assert re.search(r'ATTRIBUTE "complete".*?\(0\): TRUE', attrs, re.S), attrs
            assert 'ATTRIBUTE "logical_dtype"' in attrs and 'DATASET "states"' in headers
            _run("h5dump", path)  # every value, states included (checksums checked)


@pytest.mark.parametrize("kind", ["plain", "merged"])
def test_h5dump_and_h5ls_read_every_file(captures, kind):
    _assert_tools_read(captures[kind], kind)


def test_h5dump_reads_a_capture_of_several_loops(tmp_path, new_hrm_text_model):
    _tool("h5dump")
    index = _capture(new_hrm_text_model(), tmp_path / "hrm.h5")
    _assert_tools_read(index, "hrm")
    run = _run("h5dump", "-H", _files(index)[1])
    assert 'GROUP "H"' in run and 'GROUP "L"' in run and 'DATASET "step_labels"' in run


def test_non_ascii_text_round_trips(captures, tmp_path):
    with loopscope.open(captures["plain"]) as capture:
        assert capture.meta["name_or_path"] == NAME
        forward, generated = capture.runs
        assert forward.tokens == [TEXTS[i % len(TEXTS)] for i in range(5, 11)]
        assert generated.tokens[:6] == forward.tokens and len(generated.tokens) == 8  # the last new one is not fed
        wanted = {run.index: run.tokens for run in capture.runs}
    with h5py.File(captures["plain"], "r") as f:  # marked UTF-8 in the file, not only UTF-8 bytes
        assert h5py.check_string_dtype(f.attrs.get_id("name_or_path").dtype).encoding == "utf-8"
        assert f.attrs["name_or_path"].decode("utf-8") == NAME
    with loopscope.open(captures["merged"]) as merged:
        assert merged.meta["name_or_path"] == NAME
        assert [run.tokens for run in merged.runs] == [wanted[0], wanted[1]] * 2
    with loopscope.open(captures["merged"]) as merged:
        export.export(merged, tmp_path / "x.npz", "npz")
    with zipfile.ZipFile(tmp_path / "x.npz") as archive, archive.open("meta.npy") as handle:
        meta = json.loads(str(np.lib.format.read_array(handle)))
    assert meta["capture"]["name_or_path"] == NAME
    assert meta["tokens"]["000000"] == wanted[0] and meta["tokens"]["000003"] == wanted[1]
    for path in (captures["plain"], captures["merged"]):
        assert verify.verify_capture(path).ok


def test_captures_written_before_still_read_merge_and_verify(new_reference_model, tmp_path, monkeypatch):
    """Earlier versions stored text as ASCII-marked bytes and wrote HDF5's newest object versions ("latest")."""
    with monkeypatch.context() as old:
        old.setattr(schema, "text", lambda value: np.bytes_(str(value).encode("utf-8")))
        old.setattr(schema, "LIBVER", "latest")
        model = new_reference_model()
        model.config.name_or_path = NAME
        index = _capture(model, tmp_path / "old.h5", NonAsciiTokenizer())
    with h5py.File(index, "r") as f:
        assert h5py.check_string_dtype(f.attrs.get_id("name_or_path").dtype).encoding == "ascii"
    with loopscope.open(index) as capture:
        assert capture.meta["name_or_path"] == NAME
        tokens = [run.tokens for run in capture.runs]
        assert tokens[0] == [TEXTS[i % len(TEXTS)] for i in range(5, 11)]
    assert verify.verify_capture(index).ok
    merge.merge(tmp_path / "merged.h5", [index])
    with loopscope.open(tmp_path / "merged.h5") as merged:
        assert merged.meta["name_or_path"] == NAME and [run.tokens for run in merged.runs] == tokens
        assert merged.runs[1].attrs["call"] == "generate"
    with h5py.File(tmp_path / "merged.h5", "r") as f:  # a merge writes its own files as this version does
        assert h5py.check_string_dtype(f.attrs.get_id("name_or_path").dtype).encoding == "utf-8"
    assert verify.verify_capture(tmp_path / "merged.h5").ok
    with loopscope.open(index) as capture:
        export.export(capture, tmp_path / "old.npz", "npz")
    if shutil.which("h5dump") or os.environ.get("LOOPSCOPE_REQUIRE_TOOLS") == "1":
        _assert_tools_read(tmp_path / "merged.h5", "merged from old")
