"""Joining captures (one per rank of a data-parallel job) into one capture, without copying a state.

The merged capture has the ordinary layout (an index plus ``OUT.h5.runs/NNNNNN.h5``), so ``loopscope.open``, the
CLI and plain h5py (``h5py.File("OUT.h5")["runs/000000/loops/core/states"]``) read it like any other. Its run
files hold copies of the small per-token data (ids, text, mask, positions, step counts) and, for the states and
per-step signals, HDF5 *virtual datasets* that map onto the source run files: a merge of terabytes writes
kilobytes. Source paths are stored relative to the merged file, so the merged capture and its sources can move
together; a missing source reads as NaN in HDF5 (not as an error), so :func:`missing_sources` checks for that.

Runs are numbered 0..N-1 in the order of the sources given, then of each source's runs; each merged run records
where it came from (``source_file``, ``source_run``, ``source_rank``, ``source_hostname`` attributes), and the
index lists the sources (``merged_from_json``) and the run map (``/merged_runs``: merged run, source, source run).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from ..errors import CaptureFileError, LoopscopeError, MergeError, disk_full, first_line
from . import checksum, dependencies, merge_output, run_files, safety, schema
from .reader import CaptureFile, Run
from .virtual import check_sources, missing_sources  # noqa: F401 - the README names merge.check_sources

#: Header fields that describe one rank's file, not the merged capture.
RANK_FIELDS = ("rank", "world_size", "local_rank", "hostname")
RUN_MAP = "merged_runs"
OWN_ATTRS = ("capture_id", "run_number")  # what ties a run file to its index: never copied from a source
#: The source run file's OWN_ATTRS, on the merged run: a source captured again since the merge is told apart.
SOURCE_ATTRS = tuple(f"source_{key}" for key in OWN_ATTRS)


@dataclass
class MergeSummary:
    path: str
    runs: int
    sources: int
    state_bytes: int  # bytes of states (and signals) the merged file maps without copying
    file_bytes: int  # bytes the merge wrote (index + run files)
    skipped_incomplete: int = 0  # runs of the sources that were cut short, left out as the reader leaves them out
    empty_sources: list[str] = field(default_factory=list)


def merge(
    out: str | os.PathLike,
    sources: Sequence[str | os.PathLike],
    *,
    force: bool = False,
    locking: bool | str | None = None,
) -> MergeSummary:
    """Write the capture ``out`` whose runs are the complete runs of ``sources``, states mapped, not copied.

    The sources must come from the same model and capture settings (same loops, hidden sizes, stored dtypes and
    readout norm); each may itself be a merged capture. ``force=True`` replaces an existing ``out``.
    """
    out = os.fspath(out)
    paths = [os.fspath(s) for s in sources]
    _check_args(out, paths)
    with merge_output.exclusive(out, locking), contextlib.ExitStack() as stack:  # from the checks to the swap
        _check_paths(out, paths, force, locking)
        captures = [stack.enter_context(_open_source(p, locking)) for p in paths]
        plan = _plan(captures)
        if not plan:
            raise MergeError(f"none of the {len(paths)} source(s) has a complete run; nothing to merge")
        merge_output.clear_leftovers(out)  # what a killed merge into ``out`` left (or a one-line error)
        state_bytes = _write(out, plan, captures, locking)
    size = os.path.getsize(out) + sum(os.path.getsize(p) for p, _ in run_files.list_run_files(out).values())
    return MergeSummary(
        path=out,
        runs=len(plan),
        sources=len(paths),
        state_bytes=state_bytes,
        file_bytes=size,
        skipped_incomplete=sum(len(c.incomplete_runs) for c in captures),
        empty_sources=[c.path for c in captures if not c.runs],
    )


def _write(out: str, plan, captures: list[CaptureFile], locking) -> int:
    """Write the merged capture whole, then put it in place (``merge_output.py``); returns the bytes mapped."""
    return merge_output.write_capture(
        out,
        lambda staging, capture_id: _write_runs(out, staging, plan, captures, locking, capture_id),
        lambda capture_id, numbers: _index_image(out, captures, plan, capture_id, numbers),
    )


# ---- checks ---------------------------------------------------------------------------------------------------------
def _check_args(out: str, sources: list[str]) -> None:
    """What needs no lock: sources given once each, none of them the output or its lock file, a folder for it."""
    if not sources:
        raise MergeError("give at least one capture to merge")
    seen: dict[str, str] = {}
    for path in sources:
        safety.require_regular(path, MergeError, "source ")
        key = os.path.realpath(path)
        if key in seen:
            raise MergeError(f"source {path} is given twice (also as {seen[key]}); each run would be merged twice")
        seen[key] = path
    if os.path.realpath(out) in seen:
        raise MergeError(f"output {out} is also a source; write the merged capture to a new file")
    lock = out + merge_output.LOCK_SUFFIX
    if os.path.realpath(lock) in seen:
        source = seen[os.path.realpath(lock)]
        raise MergeError(
            f"source {source} is where merging into {out} takes its lock; write the merged capture to a new file"
        )
    if os.path.isdir(out):
        raise MergeError(f"output {out} is a directory; pass a file name such as {out}/merged.h5")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise MergeError(f"cannot create {out}: directory {parent} does not exist; create it first")


def _check_paths(out: str, sources: list[str], force: bool, locking) -> None:
    """Under the merge lock: nothing the sources read is written over, and ``out`` is new or ``force``d."""
    read = [dependencies.capture_files([source], locking=locking) for source in sources]  # each walked once
    _check_output_spares_sources(out, dependencies.CaptureFiles.joined(read), force)  # first: no --force advice
    _check_sources_distinct(sources, read)
    if (os.path.exists(out) or run_files.list_run_files(out)) and not force:
        raise MergeError(f"{out} already exists; pass --force (force=True) to replace it")
    try:
        run_files.refuse_if_written(out, locking)  # --force would swap its run folder away under it
    except LoopscopeError as exc:
        raise MergeError(str(exc)) from None


def _check_output_spares_sources(out: str, protected: dependencies.CaptureFiles, force: bool) -> None:
    """Refuse an output whose writing or ``force`` removal would destroy what the sources read (``protected``):
    their index and run files, the files their runs map (followed through merges of merges: a source may map the
    very capture being replaced), or their run folders, which must not hold a capture of their own either."""
    advice = "write the merged capture to a new file, outside the sources' run folders"
    for path in (out, out + merge_output.LOCK_SUFFIX, run_files.runs_dir(out)):  # the lock file is removed at the end
        clash = protected.holding(path)
        if clash is not None:
            raise MergeError(f"output {clash}; {advice}" if path == out else f"output {out}: {clash}; {advice}")
    if force:
        for path, _ in run_files.list_run_files(out).values():
            clash = protected.holding(path)
            if clash is not None:
                raise MergeError(f"--force (force=True) would delete the run files of {out}, but {clash}; {advice}")


def _check_sources_distinct(sources: list[str], read: list[dependencies.CaptureFiles]) -> None:
    """No two sources may read the same run file (``read``: the files of each): a merged capture together with one
    of the captures it maps would give every run of that one twice, and analysis would count it twice unnoticed."""
    owner: dict[object, str] = {}
    for source, files in zip(sources, read):
        for path in files.files:
            key = safety.file_identity(path)
            if key is None or os.path.realpath(path) == os.path.realpath(source):
                continue  # gone, or its index: every source has its own
            first = owner.setdefault(key, source)
            if first != source:
                raise MergeError(
                    f"sources {first} and {source} hold the same runs ({safety.clean(path)} is read by both, e.g. "
                    "a merged capture and one it maps); merge each capture once"
                )


@contextlib.contextmanager
def _open_source(path: str, locking):
    try:
        capture = CaptureFile(path, locking=locking)
    except LoopscopeError as exc:
        raise MergeError(f"source {exc}") from None
    with capture:
        yield capture


def _plan(captures: list[CaptureFile]) -> list[tuple[int, Run]]:
    """(source position, run) for every complete run, after checking that all of them can share one capture."""
    first = captures[0]
    shapes: dict[str, tuple[int, str, str]] = {}  # loop -> (hidden, logical dtype, where first seen)
    plan = []
    for position, capture in enumerate(captures):
        _check_same_loops(first, capture)
        _source_rank(capture)  # before anything is written
        for run in capture.runs:
            try:
                for loop in run.loops:  # reading the loops validates the run file's layout
                    seen = (run.hidden_size(loop), run.logical_dtype(loop))
                    known = shapes.setdefault(loop, (*seen, f"{capture.path} run {run.index}"))
                    if seen != known[:2]:
                        raise MergeError(
                            f"loop {loop!r}: {capture.path} run {run.index} has hidden size {seen[0]}, "
                            f"dtype {seen[1]}; {known[2]} has hidden size {known[0]}, dtype {known[1]}; "
                            "merge captures of one model and dtype"
                        )
            except MergeError:
                raise
            except LoopscopeError as exc:
                raise MergeError(f"source {capture.path}: {exc}") from None
            plan.append((position, run))
        _check_same_readout(first, capture)  # after the shapes, whose message is the clearer one
    return plan


def _check_same_loops(first: CaptureFile, other: CaptureFile) -> None:
    if other.loop_names != first.loop_names:
        raise MergeError(
            f"{other.path} recorded loops {other.loop_names}, {first.path} {first.loop_names}; "
            "merge captures of one model"
        )
    a, b = _model_class(first), _model_class(other)
    if a != b:
        raise MergeError(f"{other.path} holds model {b}, {first.path} {a}; merge captures of one model")


def _model_class(capture: CaptureFile) -> str | None:
    """The source's ``model_class`` attribute: its text, None when absent; anything else is a damaged header."""
    value = capture.meta.get("model_class")
    name = schema.as_text(value)
    if value is not None and name is None:
        raise MergeError(f"source {capture.path}: model_class {safety.clean(value)!r} is not text; damaged")
    return name


def _source_rank(capture: CaptureFile) -> int:
    """The source's ``rank`` attribute (-1 when absent): an integer, else a damaged header."""
    value = capture.meta.get("rank", -1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise MergeError(f"source {capture.path}: rank {safety.clean(value)!r} is not an integer; damaged")
    return int(value)


def _check_same_readout(first: CaptureFile, other: CaptureFile) -> None:
    if not first.readout.same_as(other.readout):
        raise MergeError(
            f"{other.path} and {first.path} store different readout norms (different weights?); "
            "merge captures of one model"
        )


# ---- writing --------------------------------------------------------------------------------------------------------
def _write_runs(out: str, staging: str, plan, captures, locking, capture_id: str) -> tuple[list[int], int]:
    """Write the merged run files into ``staging``'s run folder (renamed to ``out``'s once all is written);
    returns their numbers and the bytes mapped."""
    files = run_files.RunFiles(staging, locking=locking, capture_id=capture_id)
    # Where they will be read from: a run folder of its own beside ``out`` (never a link, as one there may be now).
    out_dir = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(out))), os.path.basename(out) + ".runs")
    state_bytes = 0
    numbers = []
    for number, (position, run) in enumerate(plan):
        source_index = captures[position]
        meta = source_index.meta
        dst = files.create_run(number)
        try:
            # Between real paths: HDF5 joins the name to the folder and the OS resolves ``..`` after symlinks.
            relative = os.path.relpath(os.path.realpath(run.path), out_dir)
            try:
                state_bytes += _copy_group(run.group, dst, relative)
                source = run.attrs  # what ties the mapping to this very source run (virtual.py checks it)
            except CaptureFileError as exc:
                raise MergeError(f"source {exc}") from None
            except (OSError, KeyError, ValueError, RuntimeError, TypeError) as exc:
                if disk_full(exc):  # writing the merged run, not reading the source
                    raise
                raise MergeError(f"source {run.path} is damaged or unreadable ({first_line(exc)})") from None
            dst.attrs.update(
                schema.attrs_to_store(
                    {
                        "source_file": _relative_to(out, source_index.path),
                        "source_run": run.index,
                        "source_rank": _source_rank(source_index),
                        "source_hostname": str(meta.get("hostname", "")),
                        **{
                            name: source[key]
                            for name, key in zip(SOURCE_ATTRS, OWN_ATTRS)
                            if isinstance(source.get(key), (str, int, np.integer))
                        },
                    }
                )
            )
        except BaseException:
            dst.close()
            raise
        files.finish_run(number, dst, complete=True)
        numbers.append(number)  # the staging folder is this merge's own: no other writer takes a number there
    return numbers, state_bytes


def _copy_group(src: h5py.Group, dst: h5py.Group, source_file: str) -> int:
    """Copy ``src`` into ``dst``: states and signals as virtual datasets onto ``source_file``, the rest as data.
    Returns the bytes mapped virtually. Only hard links are followed, and data is copied only where the source
    stores what it declares (the source is someone else's file)."""
    path = src.file.filename
    for key, value in safety.read_attrs(src, path).items():
        if src.name != "/" or key not in OWN_ATTRS + SOURCE_ATTRS:  # the merged run has its own id, number, source
            dst.attrs[key] = schema.restored(value)  # text as UTF-8, whatever version wrote the source
    mapped = 0
    for name in list(src.keys()):
        obj = safety.hard_child(src, name, path)
        if isinstance(obj, h5py.Dataset):
            safety.check_plain(obj, path)
        if isinstance(obj, h5py.Group):
            mapped += _copy_group(obj, dst.create_group(name), source_file)
        elif _is_mapped(obj):
            mapping = h5py.VirtualLayout(shape=obj.shape, dtype=obj.dtype)
            mapping[...] = h5py.VirtualSource(source_file, obj.name, shape=obj.shape, dtype=obj.dtype)
            virtual = dst.create_virtual_dataset(name, mapping, fillvalue=obj.fillvalue)
            for key, value in safety.read_attrs(obj, path).items():
                virtual.attrs[key] = schema.restored(value)
            # Virtual datasets have no chunks of their own; analysis reads in blocks aligned with the source's.
            virtual.attrs["source_chunks"] = np.asarray(schema.dataset_chunks(obj), dtype=np.int64)
            mapped += obj.size * obj.dtype.itemsize
        else:  # per-token data, in chunks of its own size (not the writer's growable ones), with its checksum
            safety.check_whole(obj, path)
            data = obj[()]
            copy = dst.create_dataset(name, data=data, **checksum.dataset_options(np.shape(data)))
            for key, value in safety.read_attrs(obj, path).items():
                copy.attrs[key] = schema.restored(value)
    return mapped


def _is_mapped(ds: h5py.Dataset) -> bool:
    """States ([T, K, H]) and per-step signals ([T, K]) are mapped; small per-token data is copied."""
    parts = ds.name.strip("/").split("/")
    is_state = len(parts) == 3 and parts[0] == schema.LOOPS and parts[2] == "states"
    is_signal = len(parts) == 4 and parts[0] == schema.LOOPS and parts[2] == schema.SIGNALS
    return (is_state or is_signal) and ds.size > 0


def _index_image(out: str, captures: list[CaptureFile], plan, capture_id: str, numbers: list[int]) -> bytes:
    """The merged index's bytes, made in memory (as ``index.py`` makes a capture's): HDF5 never writes it to disk
    itself, where a full disk fails inside its flush; the caller writes the bytes, a full disk one OSError."""
    first = captures[0]
    image = io.BytesIO()
    with (
        safety.open_h5(first.path, MergeError, "source ", **first._open_kwargs) as src,
        h5py.File(image, "w", libver=schema.LIBVER) as index,
    ):
        for key, value in safety.read_attrs(src, first.path).items():
            if key not in RANK_FIELDS and key not in OWN_ATTRS:
                index.attrs[key] = schema.restored(value)
        index.attrs["capture_id"] = schema.text(capture_id)  # as in its run files, which it ties to this index
        readout = safety.hard_child(src, schema.READOUT, first.path, h5py.Group)
        if readout is not None:  # rewritten, not copied: a copy keeps the source's HDF5 object versions
            _copy_group(readout, index.create_group(schema.READOUT), "")
        sources = [
            {
                "file": _relative_to(out, c.path),
                "runs": len(c.runs),
                **{k: c.meta.get(k) for k in RANK_FIELDS},
            }
            for c in captures
        ]
        index.attrs.update(
            schema.attrs_to_store(
                {
                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "merged_from": sources,
                }
            )
        )
        table = np.array([(n, position, run.index) for n, (position, run) in enumerate(plan)], dtype=np.int64)
        table = table.reshape(-1, 3)
        runs_map = index.create_dataset(RUN_MAP, data=table, **checksum.dataset_options(table.shape))
        runs_map.attrs["columns_json"] = schema.text('["run", "source", "source_run"]')
        group = index.create_group(schema.RUNS)
        folder = os.path.basename(run_files.runs_dir(out))
        for number in numbers:
            name = schema.run_name(number)
            group[name] = h5py.ExternalLink(f"{folder}/{name}.h5", "/")
    return image.getvalue()


def _relative_to(out: str, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(out)))
