"""One packed copy of the frozen experts per host when several training processes run on it.

[NOTE] Under torchrun / accelerate every rank of a host would pack (or stream) every expert into its
own engine: N copies of what is most of the host's memory. Instead the host's first local rank packs
each layer into a file of `/dev/shm` and the others map the same pages after it is done (engines over
external memory: `ExpertEngine.from_experts(memory=..., filled=True)`), so the host holds the experts
once and each rank's proportional share (PSS) is 1/N of them. Once every rank has mapped them the
files are unlinked: the mappings live on until the processes exit, and no file outlives the run, a
crash included (a kill between packing and mapping leaves at most that window's files; they are
also unlinked at exit). The space is reserved before packing (`posix_fallocate`): where `/dev/shm`
is too small (containers default to 64 MB) every rank keeps its own copy, with a warning saying how
to give it room, rather than dying of SIGBUS.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
from typing import Callable

import torch
import torch.distributed as dist

from .engine import ExpertEngine

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
_unlink_at_exit: set[str] = set()


def sharing() -> bool:
    """Whether several ranks of this host train in one process group (`LOCAL_WORLD_SIZE` > 1)."""
    return (dist.is_available() and dist.is_initialized() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1
            and os.path.isdir(SHM_DIR))


def host_engines(sizes: list[tuple], fill: Callable[[list], list[ExpertEngine]],
                 attach: Callable[[int, torch.Tensor], ExpertEngine]) -> list[ExpertEngine]:
    """The engines of `len(sizes)` layers, one copy per host.

    Args:
        sizes: Per layer `(E, H, I, format, block_k)`.
        fill: Builds and fills every layer's engine given per-layer memory (None: its own); runs on
            the first local rank (on every rank when nothing is shared).
        attach: `attach(i, memory)`: layer i's engine over memory another rank filled.
    """
    if not sharing():
        return fill([None] * len(sizes))
    token = [secrets.token_hex(6) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    paths = [os.path.join(SHM_DIR, f"kt_trl-{os.getuid()}-{token[0]}-{i}") for i in range(len(sizes))]
    nbytes = [ExpertEngine.weight_bytes(*size) for size in sizes]
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    engines, status = _fill_shared(paths, nbytes, fill) if first else (None, "ok")
    statuses = _gather(status)
    failed = [s for s in statuses if s.startswith("packing")]
    if failed:
        raise RuntimeError(failed[0])
    if any(s != "ok" for s in statuses):
        logger.warning("kt_trl: %s", next(s for s in statuses if s != "ok"))
        if first and status == "ok":   # another host's ranks could not share: this one's copy stays private
            _unlink(paths)
            return engines
        return fill([None] * len(sizes))
    mapped, error = "mapped", None
    if not first:
        try:
            engines = [attach(i, _map(path, n)) for i, (path, n) in enumerate(zip(paths, nbytes))]
        except BaseException as caught:   # the others must not wait for this rank forever
            mapped, error = f"mapping the host's packed experts failed on rank {dist.get_rank()}: {caught!r}", caught
    statuses = _gather(mapped)
    if first:
        _unlink(paths)
    if error is not None:
        raise error
    if any(s != "mapped" for s in statuses):
        raise RuntimeError(next(s for s in statuses if s != "mapped"))
    logger.info("kt_trl: the routed experts (%.2f GB packed) are held once on this host for its %s ranks.",
                sum(nbytes) / 1e9, os.environ.get("LOCAL_WORLD_SIZE"))
    return engines


def _fill_shared(paths: list[str], nbytes: list[int], fill) -> tuple[list | None, str]:
    """On the host's first rank: the engines filled into new shared files, and "ok" or why there are none."""
    try:
        memories = [_create(path, n) for path, n in zip(paths, nbytes)]
    except OSError as error:
        _unlink(paths)
        return None, (f"{SHM_DIR} cannot hold the {sum(nbytes) / 1e9:.2f} GB of packed experts ({error}); every rank "
                      "keeps its own copy. Give it room (docker run --shm-size=..., or a larger tmpfs) to hold them "
                      "once per host.")
    try:
        return fill(memories), "ok"
    except BaseException as error:   # the other ranks learn it from the status instead of waiting forever
        _unlink(paths)
        _gather(f"packing the experts failed on local rank 0 of a host: {error!r}")
        raise


def _gather(status: str) -> list[str]:
    statuses = [None] * dist.get_world_size()
    dist.all_gather_object(statuses, status)
    return statuses


def _create(path: str, nbytes: int) -> torch.Tensor:
    if not _unlink_at_exit:
        atexit.register(_unlink, _unlink_at_exit)
    _unlink_at_exit.add(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)   # ENOSPC now, not SIGBUS when a page is first written
    finally:
        os.close(fd)
    return _map(path, nbytes)


def _map(path: str, nbytes: int) -> torch.Tensor:
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _unlink(paths) -> None:
    for path in list(paths):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        _unlink_at_exit.discard(path)
