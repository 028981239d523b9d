"""Which rank of a data-parallel job this process is, and the capture file it may write.

Under ``torchrun`` or ``accelerate launch`` every rank runs the same script, so ``attach(model, "cap.h5")`` is
called once per rank with the same path. Ranks must not clobber one file, and a merged study must know which rank
wrote which run, so each rank writes its own capture (``cap.rank00003.h5``, or wherever a ``{rank}`` placeholder
puts the number) and records rank, world size, local rank and host name in the header. ``loopscope merge`` then
joins the rank files without copying states.

The rank comes from ``torch.distributed`` when a process group is initialised, else from the ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` variables that torchrun and accelerate set before the script starts (so a
rank that captures before, or without, ``init_process_group`` is still told apart).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass

from ..errors import LoopscopeError

PLACEHOLDER = "{rank}"


@dataclass(frozen=True)
class RankInfo:
    rank: int
    world_size: int
    local_rank: int
    hostname: str


def rank_info() -> RankInfo:
    """This process's place in the job; rank 0 of 1 for a plain single-process run."""
    rank, world = _from_torch()
    if rank is None:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0 if world == 1 else -1)  # -1: the launcher did not say
    if world < 1 or not 0 <= rank < world:
        raise LoopscopeError(f"rank {rank} of world size {world} is not a valid rank; check RANK and WORLD_SIZE")
    return RankInfo(rank, world, local, socket.gethostname())


def describe() -> dict:
    """Header fields: rank, world_size, local_rank, hostname (stored in every capture, single process too)."""
    return asdict(rank_info())


def rank_path(path: str | os.PathLike) -> str:
    """The capture path this rank writes: ``path`` itself in a single process, else a per-rank name.

    A ``{rank}`` in the path is replaced by the zero-padded rank (also in a single process, as rank 0); otherwise,
    when the world size is above 1, ``.rankNNNNN`` goes before the extension: ``cap.h5`` -> ``cap.rank00003.h5``.
    """
    path = os.fspath(path)
    info = rank_info() if PLACEHOLDER in path or _maybe_distributed() else None
    if info is None:
        return path
    number = f"{info.rank:05d}"
    if PLACEHOLDER in path:
        return path.replace(PLACEHOLDER, number)
    if info.world_size == 1:
        return path
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name)
    return os.path.join(folder, f"{stem}.rank{number}{ext or '.h5'}")


def _maybe_distributed() -> bool:
    return "WORLD_SIZE" in os.environ or "RANK" in os.environ or _from_torch()[0] is not None


def _from_torch() -> tuple[int | None, int]:
    """(rank, world size) from an initialised default process group, or (None, 1). Never imports torch itself."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None, 1
    return dist.get_rank(), dist.get_world_size()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise LoopscopeError(f"environment variable {name}={value!r} is not an integer rank") from None
