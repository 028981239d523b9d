"""Defences against hostile files, shared by the reader, merge, export, the CLI and the figures (no torch).

A crafted file can declare terabytes it does not hold, point HDF5 at a FIFO or /dev/zero, or carry markup and
terminal escape sequences in its strings. Everything here checks what a file declares against what it can hold
before anything is allocated or opened, and turns every string from a file into inert text.
"""

from __future__ import annotations

import json
import os
import stat
import unicodedata

import h5py
import numpy as np

from ..errors import CaptureFileError
from . import schema

# Generous ceilings: far beyond any real capture, far below what would exhaust memory or time.
MAX_TOKENS = 1 << 26  # tokens in one run
MAX_HIDDEN = 1 << 20  # width of a state
MAX_STEPS = 1 << 20  # stored steps of one loop
MAX_STRIDE = 1 << 20  # step_stride
MAX_WHOLE_BYTES = 512 << 20  # one dataset read whole (token data, num_steps, signals, readout, labels)
MAX_CHUNK_BYTES = 64 << 20  # one states chunk (the writer aims at 1 MiB; a row of 2**20 float64 is 8 MiB)
MAX_ATTR_BYTES = 4 << 20  # one attribute (config JSON included)
MAX_JSON_DEPTH = 64
# Datasets read whole are stored uncompressed; filters such as Fletcher-32 add a few bytes per chunk, so stored
# bytes are never far below declared ones. States may be compressed, and unwritten chunks read as NaN.
WHOLE_RATIO = 4
STATES_RATIO = 1024
STATES_FILL_FLOOR = 256 << 20
SPARSE_FILL_FLOOR = 64 << 20
MIN_CHUNK_BYTES = 4096  # smaller states chunks are refused once a dataset spans more than MANY_CHUNKS of them
MANY_CHUNKS = 1 << 16
MAX_MAPPINGS = 1 << 16  # selections of one virtual dataset (``merge`` writes one per dataset)

_INVISIBLE = frozenset(("Cc", "Cf", "Zl", "Zp"))  # controls, format (bidi overrides), line/paragraph separators


MISSING = "no such file"
DIRECTORY = "a directory"
NOT_REGULAR = "not a regular file (a FIFO, device or socket)"


def file_problem(path: str | os.PathLike) -> str | None:
    """Why HDF5 must not be pointed at ``path`` (missing, unreadable, a directory, a FIFO, device or socket), or None
    for a regular file (symlinks followed). A FIFO, device or socket would block HDF5's open forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return MISSING
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        return f"cannot read it ({getattr(exc, 'strerror', None) or exc})"
    if stat.S_ISDIR(mode):
        return DIRECTORY
    return None if stat.S_ISREG(mode) else NOT_REGULAR


def file_identity(path: str | os.PathLike) -> object | None:
    """What makes two paths one file: (device, inode) after symlinks, so a symlink or a second hard link is the same
    file (as it is to HDF5); the real path where the file system has no inode numbers; None when nothing is there."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return (info.st_dev, info.st_ino) if info.st_ino else os.path.normcase(os.path.realpath(path))


def require_regular(path: str | os.PathLike, error=CaptureFileError, what: str = "") -> str:
    """``path`` if it is a regular file (symlinks followed); a FIFO, device or socket would block HDF5 forever."""
    path = os.fspath(path)
    problem = file_problem(path)
    where = f"{what}{clean(path)}"
    if problem == MISSING:
        raise error(f"{where}: no such file; check the path")
    if problem == DIRECTORY:
        raise error(f"{where} is a directory; pass the .h5 capture file inside it")
    if problem == NOT_REGULAR:
        raise error(f"{where} is {NOT_REGULAR}; pass a capture file")
    if problem is not None:
        raise error(f"{where}: {problem}")
    return path


class NotRegularFile(OSError):
    """Raised by :func:`open_regular` for a path HDF5 must not open; an OSError, as h5py's own open errors are."""


def open_regular(path: str | os.PathLike, **kwargs) -> h5py.File:
    """h5py.File(path, "r") for callers that report errors their own way (``verify`` lists them, a Dask task names
    its file): a path that is not a regular file raises :class:`NotRegularFile` before HDF5 could block on it."""
    problem = file_problem(path)
    if problem is not None:
        raise NotRegularFile(problem)
    return h5py.File(path, "r", **kwargs)


def open_h5(path: str | os.PathLike, error=CaptureFileError, what: str = "", **kwargs) -> h5py.File:
    """h5py.File(path, "r") after :func:`require_regular`; an unreadable file is one ``error`` line."""
    path = require_regular(path, error, what)
    try:
        return h5py.File(path, "r", **kwargs)
    except OSError as exc:
        problem = "is unreadable" if what else "is not a readable HDF5 file"
        raise error(f"{what}{clean(path)} {problem} ({clean(_first(exc))})") from None


def clean(text) -> str:
    """Text from a file as inert characters: control codes (C0, DEL, C1) and invisible format characters (a bidi
    override would reorder the rest of a terminal line) shown as ``\\x1b``, ``\\u202e``-style escapes."""
    text = str(text)
    if text.isprintable():  # the common case: every hidden category is unprintable, so nothing to escape
        return text
    return "".join(_escaped(c) if unicodedata.category(c) in _INVISIBLE else c for c in text)


def _escaped(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def figure_text(text) -> str:
    """Text from a file for a matplotlib title, label or tick: no control codes, ``$`` never starts mathtext."""
    return clean(text).replace("$", r"\$")


def parse_json(text: str):
    """Parsed JSON, or ``text`` itself when it is damaged, too long or nested deeper than any loopscope writes."""
    if len(text) > MAX_ATTR_BYTES:
        return text
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if _depth(value) <= MAX_JSON_DEPTH else text


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            todo.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            todo.extend((v, depth + 1) for v in item)
    return deepest


def read_attrs(obj, path: str) -> dict:
    """Every attribute of ``obj``, each checked to be of a sane size before h5py allocates it."""
    out = {}
    for name in list(obj.attrs.keys())[:4096]:
        aid = obj.attrs.get_id(name)
        size = int(np.prod(aid.shape or (), dtype=np.float64)) * max(aid.dtype.itemsize, 1)
        if size > MAX_ATTR_BYTES:
            raise CaptureFileError(f"{clean(path)}: attribute {clean(name)!r} declares {size} bytes; damaged")
        out[name] = obj.attrs[name]
    return out


def hard_child(group: h5py.Group, name: str, path: str, kind=None):
    """``group[name]`` when it is a hard link (of ``kind``), None when absent. Soft and external links are refused:
    loopscope writes none inside run files, and following one can open any file (a FIFO blocks forever). A virtual
    dataset's mappings are checked (:func:`check_virtual`) before anything asks for its shape."""
    link = group.get(name, getlink=True)
    if link is None:
        return None
    if not isinstance(link, h5py.HardLink):
        raise CaptureFileError(f"{clean(path)}: {clean(group.name.rstrip('/'))}/{clean(name)} is a link; damaged")
    obj = group[name]
    if kind is not None and not isinstance(obj, kind):
        raise CaptureFileError(f"{clean(path)}: {clean(obj.name)} is not a {kind.__name__.lower()}; damaged")
    if isinstance(obj, h5py.Dataset) and obj.is_virtual:
        check_virtual(obj, path)
    return obj


def hard_dataset(file: h5py.File, name: str, path: str) -> h5py.Dataset | None:
    """The dataset at ``name`` (an absolute path in ``file``) reached through hard links only, else None; a soft or
    external link on the way is refused, as by :func:`hard_child`. HDF5 follows any link in a virtual dataset's
    source name, so a crafted one could reach a FIFO."""
    obj: h5py.Group | h5py.Dataset = file
    for part in (p for p in name.split("/") if p not in ("", ".")):
        if not isinstance(obj, h5py.Group):
            return None
        child = hard_child(obj, part, path)
        if child is None:
            return None
        obj = child
    return obj if isinstance(obj, h5py.Dataset) else None


VDS_PREFIX = "HDF5_VDS_PREFIX"
# HDF5 keeps the value this variable had when the library started (h5py's import, above) as a second prefix; a
# dataset's own virtual_prefix (h5py's access option) replaces it only where it is unset, and loopscope sets none.
_PREFIX_AT_START = os.environ.get(VDS_PREFIX)
_ORIGIN = "${ORIGIN}"


def source_candidates(vds_file: str, name: str) -> list[str]:
    """The paths HDF5 tries, in its order, for the source file ``name`` of a virtual dataset in ``vds_file`` (HDF5
    2.0, measured): ``"."`` is that file; an absolute name as is, then its last part in the places below; each
    entry of ``HDF5_VDS_PREFIX`` now (colon-separated); its value when the library started (``${ORIGIN}`` there is
    the file's folder); the file's folder as opened; the working directory; the folder the file's symlink points
    into. Paths are joined, not normalised: the OS resolves ``..`` after symlinks, as it does for HDF5."""
    own = os.path.abspath(vds_file)
    if name == ".":
        return [own]
    tried = []
    if os.path.isabs(name):
        tried.append(name)
        name = name.rsplit("/", 1)[-1]
    folder = os.path.dirname(own)
    prefixes = [p for p in os.environ.get(VDS_PREFIX, "").split(":") if p]
    start = _PREFIX_AT_START
    if start and start != ".":
        prefixes.append(folder + "/" + start[len(_ORIGIN) :] if start.startswith(_ORIGIN) else start)
    actual = os.path.realpath(own) if os.path.islink(own) else own
    tried += [_join(p, name) for p in (*prefixes, folder)] + [name, _join(os.path.dirname(actual), name)]
    return list(dict.fromkeys(tried))


def mapped_file(vds_file: str, name: str) -> str:
    """The file HDF5 reads for a virtual dataset's source ``name``: the first of :func:`source_candidates` that
    exists (HDF5 opens it or fails, it never goes on to the next), else the first, which a "missing" message
    names. Readers, ``verify``, the cycle walk and what ``export``/``merge`` protect all use this one answer."""
    candidates = source_candidates(vds_file, name)
    found = next((c for c in candidates if os.path.exists(c)), candidates[0])
    return _tidy(found)


def _join(folder: str, name: str) -> str:
    """``folder`` + ``name`` as HDF5 joins them (a separator only where needed; an empty folder adds nothing)."""
    return name if not folder else folder + ("" if folder.endswith("/") else "/") + name


def _tidy(path: str) -> str:
    """``path`` readable in messages, naming the same file: ``.`` and doubled separators dropped, and the part up
    to the last ``..`` resolved as the OS resolves it (after symlinks) when that folder exists."""
    parts = path.split("/")
    if ".." not in parts:
        return os.path.abspath(path)
    cut = len(parts) - parts[::-1].index("..")
    head = "/".join(parts[:cut]) or "/"
    if not os.path.isdir(head):
        return path
    return os.path.normpath(os.path.join(os.path.realpath(head), *parts[cut:]))


def check_virtual(ds: h5py.Dataset, path: str, error=CaptureFileError) -> None:
    """A virtual dataset's mappings, before HDF5 is asked for its shape or data: fixed selections only (HDF5 opens
    every source of an unlimited one, and expands its printf-style file names, as soon as the shape is asked for;
    ``merge`` never writes one), and every source file that is present a regular file (a FIFO blocks forever)."""
    where = f"{clean(path)}: {clean(ds.name)}"
    try:
        dcpl = ds.id.get_create_plist()
        count = dcpl.get_virtual_count()
        if count > MAX_MAPPINGS:
            raise error(f"{where} maps {count} selections of other files; damaged")
        for i in range(count):
            if _unlimited(dcpl.get_virtual_vspace(i)) or _unlimited(dcpl.get_virtual_srcspace(i)):
                raise error(f"{where} maps an unlimited selection, which loopscope never writes; damaged")
            source = mapped_file(ds.file.filename, dcpl.get_virtual_filename(i))
            if file_problem(source) == NOT_REGULAR:
                raise error(f"{where} maps {clean(source)}, which is {NOT_REGULAR}; damaged")
        # Every cell mapped, as merge maps the whole shape: a declared shape far beyond the mappings would be read
        # as fill for hours, or allocated whole. (The shape is safe to ask for now: no selection is unlimited.)
        points = sum(dcpl.get_virtual_vspace(i).get_select_npoints() for i in range(count))
        mapped = min(int(points), int(np.prod(ds.shape, dtype=np.float64))) * ds.dtype.itemsize
        if declared_bytes(ds) - mapped > STATES_FILL_FLOOR:
            raise error(f"{where} declares {declared_bytes(ds)} bytes but maps {mapped}; the file is damaged")
    except (OSError, ValueError, RuntimeError) as exc:  # a mapping HDF5 cannot decode, a name that is not UTF-8
        raise error(f"{where} has unreadable mappings ({clean(_first(exc))}); damaged") from None


def _unlimited(space) -> bool:
    """Whether a selection grows with its dataset (only a regular hyperslab can: H5S_UNLIMITED count or block)."""
    if space.get_select_type() != h5py.h5s.SEL_HYPERSLABS or not space.is_regular_hyperslab():
        return False
    _, _, count, block = space.get_regular_hyperslab()
    return h5py.h5s.UNLIMITED in (*count, *block)


def file_bytes(ds: h5py.Dataset) -> int:
    """Size of the file holding ``ds``: no dataset in it can store more."""
    try:
        return os.path.getsize(ds.file.filename)
    except OSError:
        return 0


def stored_bytes(ds: h5py.Dataset) -> int:
    """Bytes ``ds`` has on disk, at most the file's size (a crafted header can claim more)."""
    return min(int(ds.id.get_storage_size()), file_bytes(ds))


def declared_bytes(ds: h5py.Dataset) -> int:
    return int(np.prod(ds.shape, dtype=np.float64)) * ds.dtype.itemsize if ds.shape else ds.dtype.itemsize


def check_plain(ds: h5py.Dataset, path: str) -> None:
    """No external storage (loopscope never writes it; it can point at /dev/zero or a FIFO)."""
    if ds.external is not None:
        raise CaptureFileError(
            f"{clean(path)}: {clean(ds.name)} uses external storage, which loopscope never writes; damaged"
        )


def check_whole(ds: h5py.Dataset, path: str, *, virtual_ok: bool = False, sparse: bool = False) -> None:
    """A dataset about to be read whole: plain storage, a sane size, and stored bytes that can hold it.
    ``sparse``: cells never recorded are fill (signals past a token's last step), bounded as states are."""
    check_plain(ds, path)
    size = declared_bytes(ds)
    if size > MAX_WHOLE_BYTES:
        raise CaptureFileError(f"{clean(path)}: {clean(ds.name)} declares {size} bytes; damaged")
    if ds.is_virtual:
        if virtual_ok:
            return
        raise CaptureFileError(
            f"{clean(path)}: {clean(ds.name)} maps other files, which loopscope never does there; damaged"
        )
    limit = max(SPARSE_FILL_FLOOR, STATES_RATIO * stored_bytes(ds)) if sparse else WHOLE_RATIO * stored_bytes(ds)
    if size > limit:
        raise CaptureFileError(
            f"{clean(path)}: {clean(ds.name)} declares {size} bytes "
            f"but stores {stored_bytes(ds)}; damaged (re-capture it)"
        )


def check_states(ds: h5py.Dataset, path: str) -> None:
    """A states dataset streamed in chunks: bounded chunks, not too many tiny ones, and not mostly fill."""
    check_plain(ds, path)
    tokens, steps, hidden = ds.shape
    if hidden > MAX_HIDDEN or steps > MAX_STEPS or tokens > MAX_TOKENS:
        raise CaptureFileError(f"{clean(path)}: {clean(ds.name)} declares shape {ds.shape}; damaged")
    if ds.is_virtual or 0 in ds.shape:  # virtual: what it maps was counted when it was reached (check_virtual)
        return
    chunks = ds.chunks
    if chunks is not None:  # a contiguous dataset is read in slices of any size
        chunk_bytes = int(np.prod(chunks, dtype=np.float64)) * ds.dtype.itemsize
        spanned = np.prod([-(-n // c) for n, c in zip(ds.shape, chunks)], dtype=np.float64)
        if chunk_bytes > MAX_CHUNK_BYTES or (chunk_bytes < MIN_CHUNK_BYTES and spanned > MANY_CHUNKS):
            raise CaptureFileError(f"{clean(path)}: {clean(ds.name)} has chunks {chunks} for shape {ds.shape}; damaged")
    # Only large datasets are weighed (the chunk index is walked to sum the stored bytes).
    if declared_bytes(ds) > STATES_FILL_FLOOR and declared_bytes(ds) > STATES_RATIO * stored_bytes(ds):
        raise CaptureFileError(
            f"{clean(path)}: {clean(ds.name)} declares {declared_bytes(ds)} bytes "
            f"but stores {stored_bytes(ds)}; damaged"
        )


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def utf8(text: str) -> bytes:
    """``text`` as UTF-8 that a reader decodes (``errors="replace"``), never an error: a lone surrogate standing for
    a raw byte (a tokenizer decoding part of a character with ``errors="surrogateescape"``) is that byte again,
    any other lone surrogate a ``?``."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def foreign_run(capture_id, attrs: dict, run: int) -> str | None:
    """What is wrong with a run file whose attributes ``attrs`` say it is not run ``run`` of the capture
    ``capture_id`` (copied in from another capture, renamed, or left by a concurrent ``mode="w"``), or None. Files
    written before capture ids existed pass; where either id is missing, the run number alone is compared (a run
    file renamed within its capture)."""
    ours, theirs = schema.as_text(capture_id), schema.as_text(attrs.get("capture_id"))
    number = attrs.get("run_number")
    same_number = number is None or (
        isinstance(number, (int, np.integer)) and not isinstance(number, bool) and int(number) == run
    )
    if not ours or not theirs:
        if same_number:
            return None
        return (
            f"holds run {clean(number)}, not run {run} (renamed, or swapped with another run file); put it back "
            "under its own number or remove it"
        )
    if theirs == ours and same_number:
        return None
    return (
        f"belongs to another capture (capture {clean(theirs)[:32]}, run {clean(number)}), not run {run} of this "
        "one; remove it or put it back where it came from"
    )
