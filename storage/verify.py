"""``loopscope verify``: check every stored chunk of a capture against its Fletcher-32 checksum.

Why: HDF5 checks a chunk only when something reads it, so a flipped bit in a run nobody has analysed yet stays
hidden until it breaks an analysis. This walks the index and every run file, recomputes each chunk's checksum
from its raw bytes (nothing is decompressed or converted) and names each damaged chunk by run, dataset, tokens
and steps. Datasets written before checksums existed are listed as not checksummed (a warning, not a failure).
A merged capture's states are virtual datasets, which have no chunks of their own: their source datasets are
checked instead, each once, down through a merge of merges. Files are opened only once known to be regular files
(a FIFO named like a run file would block HDF5 forever), and a run file whose mappings form a cycle is listed, not
followed. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py

from ..errors import CaptureFileError, LoopscopeError, first_line
from . import checksum, layout, run_files, safety, schema, virtual
from .damage import verify_hint
from .reader import CaptureFile


@dataclass(frozen=True)
class Finding:
    """One damaged chunk, unreadable file or unchecked dataset, and where it is."""

    run: int | None  # None: the index file
    file: str
    dataset: str
    where: str  # "tokens 64-127, steps 0-15", "" for a whole dataset
    problem: str


@dataclass
class VerifyResult:
    path: str
    files: int = 0
    datasets: int = 0
    chunks: int = 0
    bytes: int = 0
    damaged: list[Finding] = field(default_factory=list)  # damaged chunks and unreadable files: a failure
    unchecked: list[Finding] = field(default_factory=list)  # datasets without a checksum: a warning
    virtual: int = 0  # virtual datasets, checked through their sources
    incomplete: list[str] = field(default_factory=list)  # run files being written or cut short (checked too)
    # what is wrong with those: a warning, since a run still being written (locked) or killed mid-write is expected
    # to be unreadable or part-written; the reader skips them too
    incomplete_problems: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged


def verify_capture(path: str | os.PathLike, *, locking: bool | str | None = None) -> VerifyResult:
    """Check every chunk of the capture at ``path`` (its index and every run file, complete or not)."""
    path = os.fspath(path)
    ours = ""
    try:
        with CaptureFile(path, locking=locking) as capture:  # a one-line error when it is not a readable capture
            ours = schema.as_text(capture.meta.get("capture_id")) or ""
        refused = None
    except CaptureFileError as exc:
        if verify_hint(path) not in str(exc):
            raise
        refused = exc  # a damaged chunk of the index (its readout) failed the open: verify lists it below
    kwargs = {"libver": "latest", **({} if locking is None else {"locking": locking})}
    result = VerifyResult(path)
    seen: set[tuple[str, str]] = set()
    _check_file(result, None, path, kwargs, seen)
    if refused is not None and not any(f.where for f in result.damaged):  # no damaged chunk to list after all
        raise refused
    for number, (run_path, complete) in run_files.list_run_files(path).items():
        found = len(result.damaged)
        _check_file(result, number, run_path, kwargs, seen, ours)
        if not complete:
            result.incomplete.append(run_path)
            result.incomplete_problems += result.damaged[found:]
            del result.damaged[found:]
    return result


def _check_file(result: VerifyResult, run: int | None, path: str, kwargs: dict, seen: set, ours: str = "") -> None:
    result.files += 1
    try:
        with safety.open_regular(path, **kwargs) as f:  # a FIFO named like a run file would block HDF5 forever
            if run is not None:  # its chunks may be sound, but the reader refuses it as this run
                refused = _belongs_elsewhere(f, run, ours) or _not_a_run(f, path)
                if refused is not None:
                    result.damaged.append(Finding(run, path, "", "", refused))
            datasets: list[h5py.Dataset] = []

            def visit(name, obj):
                if isinstance(obj, h5py.Dataset):
                    datasets.append(obj)

            f.visititems(visit)  # external links (the index's /runs) are not followed: run files come on their own
            mapped = _mappings_problem(f, path) if any(ds.is_virtual for ds in datasets) else None
            if mapped is not None:  # a cycle (HDF5 would crash), a FIFO, an unlimited mapping: sources not opened
                result.damaged.append(Finding(run, path, "", "", mapped))
            for ds in datasets:
                if ds.is_virtual and mapped is not None:
                    continue
                _check_dataset(result, run, path, ds, kwargs, seen)
    except safety.NotRegularFile as exc:
        result.damaged.append(Finding(run, path, "", "", str(exc)))
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
        result.damaged.append(Finding(run, path, "", "", f"unreadable ({first_line(exc)})"))


def _belongs_elsewhere(f: h5py.File, run: int, ours: str) -> str | None:
    """What the reader says of a run file of another capture (see ``safety.foreign_run``), or None."""
    try:
        attrs = safety.read_attrs(f, f.filename)
    except CaptureFileError:
        return None  # a damaged attribute: the reader's own error, not this one
    return safety.foreign_run(ours, attrs, run)


def _not_a_run(f: h5py.File, path: str) -> str | None:
    """What the reader's layout check says of a run file (no run file at all: another HDF5 file under its name, the
    index copied there; datasets missing or of the wrong shape), or None. Metadata only: no chunk is read here."""
    try:
        layout.check_run(f, path)
    except CaptureFileError as exc:
        return _without_path(str(exc), path)
    return None


def _mappings_problem(f: h5py.File, path: str) -> str | None:
    """What is wrong with the virtual datasets of ``f`` and the files they map (see ``virtual.check_mappings``), or
    None; missing sources are not a problem here, they are listed per dataset."""
    try:
        virtual.check_mappings(f, path)
    except LoopscopeError as exc:
        return _without_path(str(exc), path)
    return None


def _without_path(text: str, path: str) -> str:
    """A reader's message without the file's name at its start: the finding's row names the file already."""
    where = safety.clean(path)
    for prefix in (f"{where}: ", f"{where} "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _check_dataset(result: VerifyResult, run, path: str, ds: h5py.Dataset, kwargs: dict, seen: set) -> None:
    name = ds.name.lstrip("/")
    if ds.is_virtual:
        result.virtual += 1
        _check_sources(result, run, path, name, ds, kwargs, seen, 1)
        return
    if ds.chunks is None and ds.id.get_storage_size() == 0:
        return  # an empty contiguous dataset holds no bytes to check
    key = (os.path.realpath(path), ds.name)
    if key in seen:
        return
    seen.add(key)
    _check_chunks(result, run, path, name, ds)


def _check_sources(result: VerifyResult, run, path: str, name: str, ds: h5py.Dataset, kwargs, seen, depth) -> None:
    """The chunks of the datasets a virtual one maps, each once; a source that is itself virtual (a merge of a
    merge) is followed down to where the chunks are. ``virtual.check_mappings`` has ruled out cycles and chains
    deeper than MAX_DEPTH; ``seen`` and ``depth`` bound the walk anyway."""
    for mapping in ds.virtual_sources():
        source = safety.mapped_file(ds.file.filename, mapping.file_name)
        key = (os.path.realpath(source), mapping.dset_name)
        if key in seen:
            continue
        seen.add(key)
        label = f"{name} (source {source}:{mapping.dset_name})"
        if not os.path.exists(source):
            result.damaged.append(Finding(run, path, label, "", "source file missing"))
            continue
        try:
            with safety.open_regular(source, **kwargs) as f:
                src = safety.hard_dataset(f, mapping.dset_name, source)
                if src is None:
                    result.damaged.append(Finding(run, path, label, "", "source dataset missing"))
                elif not src.is_virtual:
                    _check_chunks(result, run, path, label, src)
                elif depth < virtual.MAX_DEPTH:
                    _check_sources(result, run, path, name, src, kwargs, seen, depth + 1)
        except (safety.NotRegularFile, CaptureFileError) as exc:
            result.damaged.append(Finding(run, path, label, "", f"source {exc}"))
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
            result.damaged.append(Finding(run, path, label, "", f"source unreadable ({first_line(exc)})"))


def _check_chunks(result: VerifyResult, run, path: str, label: str, ds: h5py.Dataset) -> None:
    result.datasets += 1
    if not checksum.has_fletcher32(ds):
        result.unchecked.append(Finding(run, path, label, "", "not checksummed (written before checksums)"))
        return
    result.chunks += checksum.chunk_count(ds)
    result.bytes += int(ds.id.get_storage_size())
    for chunk in checksum.damaged_chunks(ds):
        result.damaged.append(Finding(run, path, label, _where(ds.name, chunk), chunk.reason))


def _where(name: str, chunk: checksum.DamagedChunk) -> str:
    """The chunk's span in the capture's terms: tokens and steps of states and signals, steps of step labels,
    bytes of the token text, tokens of the other per-token data."""
    parts = name.strip("/").split("/")
    leaf = parts[-1]
    axes: tuple[str, ...]
    if leaf == "step_labels":
        axes = ("steps",)
    elif leaf == "token_bytes":
        axes = ("bytes",)
    elif parts[0] == schema.READOUT:
        axes = ("entries",)
    else:  # states [T, K, H], signals [T, K], per-token data [T]
        axes = ("tokens", "steps")
    spans = [f"{axis} {a}-{b}" for i, axis in enumerate(axes[: len(chunk.offset)]) for a, b in [chunk.span(i)]]
    return ", ".join(spans)


def describe(result: VerifyResult) -> str:
    """One line: what was checked and what was found."""
    text = (
        f"{result.files} file(s), {result.datasets} dataset(s), {result.chunks} chunk(s), "
        f"{result.bytes / 2**20:.1f} MiB checked"
    )
    if result.virtual:
        text += f"; {result.virtual} virtual dataset(s) checked through their sources"
    return text


def check(path: str | os.PathLike, **options) -> VerifyResult:
    """:func:`verify_capture`, raising a one-line CaptureFileError naming the first damaged chunk, if any."""
    result = verify_capture(path, **options)
    if result.damaged:
        first = result.damaged[0]
        run = "index" if first.run is None else f"run {first.run}"
        raise CaptureFileError(
            f"{result.path}: {len(result.damaged)} damaged chunk(s); first: {run}, {first.dataset}"
            + (f", {first.where}" if first.where else "")
            + f": {first.problem}"
        )
    return result
