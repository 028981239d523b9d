"""What reading a damaged or vanished file raises: whatever h5py throws becomes one CaptureFileError line that names
the file and, for a chunk that failed its checksum, points at ``loopscope verify``. Shared by the index and run readers.
"""

from __future__ import annotations

import contextlib
import os

from ..errors import CaptureFileError, first_line


@contextlib.contextmanager
def reading(path: str):
    """Turn what h5py raises on a damaged or vanished file into one CaptureFileError line naming the file."""
    try:
        yield
    except CaptureFileError:
        raise
    except OSError as exc:
        if chunk_check_failed(exc):
            folder = os.path.dirname(path)  # a run file lives in INDEX.h5.runs/
            index = folder[: -len(".runs")] if folder.endswith(".runs") else path
            raise CaptureFileError(
                f"{path}: a chunk failed its checksum on read (the file was damaged on disk); {verify_hint(index)}"
            ) from None
        raise CaptureFileError(f"{path} is damaged or unreadable ({first_line(exc)})") from None
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise CaptureFileError(f"{path} is damaged or unreadable ({first_line(exc)})") from None


def chunk_check_failed(exc: OSError) -> bool:
    """Whether HDF5 refused a chunk in its filter pipeline on read: a Fletcher-32 mismatch (HDF5 reports only
    "filter returned failure during read"), or damaged compressed bytes."""
    text = str(exc).lower()
    return "filter returned failure" in text or "fletcher32" in text or "checksum" in text


def verify_hint(index_path: str) -> str:
    return f"`loopscope verify {index_path}` lists every damaged chunk"


def damaged_read_message(ds, selection, where: str, index_path: str) -> str:
    """One line naming ``where`` (run and loop), the tokens and steps of the damaged chunk of a read of ``ds`` (found
    by checking the chunks the selection touches; the selection's own span where they cannot be checked here, as in
    a merged run)."""
    import h5py

    from . import checksum

    what = "chunk checksum mismatch"
    try:
        start, end = h5py._hl.selections.select(ds.shape, selection, ds).id.get_select_bounds()
        span = [(start[0], end[0]), (start[1], end[1])]
        if checksum.has_fletcher32(ds):
            within = tuple((a, b + 1) for a, b in zip(start, end))
            damaged = list(checksum.damaged_chunks(ds, within))
            if damaged:
                span = [damaged[0].span(0), damaged[0].span(1)]
                if damaged[0].reason != "checksum mismatch":  # a chunk that could not even be read
                    what = f"chunk {damaged[0].reason}"
                if len(damaged) > 1:
                    what += f" (and {len(damaged) - 1} more chunk(s) of this read)"
            else:
                what = "a chunk failed to decode"
    except Exception:  # naming the place is best effort; the error itself stands
        span = None
    if span is not None:
        where += f", tokens {span[0][0]}-{span[0][1]}, steps {span[1][0]}-{span[1][1]}"
    return f"{where}: {what} (the file was damaged on disk); {verify_hint(index_path)}"
