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
