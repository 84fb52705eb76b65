"""Several training processes (torchrun, accelerate launch): what DDP leaves alone, and what it does not reduce.

[NOTE] Under DDP every rank holds the model, and DDP broadcasts module state at construction and
all-reduces the gradients of the parameters it manages. The CPU-routed experts do not fit that:
their frozen weights are zero-stride placeholders (the engine holds the values; a broadcast into
them fails) and their LoRA parameters live in host memory beside GPU parameters (DDP refuses mixed
devices). So `ignore_in_ddp` puts every parameter and buffer of a routed experts module in DDP's
ignore list, and `reduce_expert_gradients` all-reduces the expert-LoRA gradients itself, at the
micro-batch that ends an accumulation window (after its backward, before Trainer clips them),
averaged as DDP averages. Each rank computes its own tokens on its own share of the host's cores
(`rank_cores`).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

# Gradients are reduced in pieces of this many bytes: a flat copy of all of them would be one more
# expert-LoRA-sized buffer in host memory.
CHUNK_BYTES = 256 * 2**20


def routed_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """`(name, tensor)` of every parameter and buffer under a CPU-routed experts module of `model`."""
    owners = [m for m in model.modules() if getattr(m, "_kt_routed", False) or hasattr(m, "_kt_runner")]
    ids = {id(t) for owner in owners for t in (*owner.parameters(), *owner.buffers())}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [(name, t) for name, t in named if id(t) in ids]


def ignore_in_ddp(model: nn.Module) -> None:
    """Keep DDP away from the routed experts' tensors (DDP reads `_ddp_params_and_buffers_to_ignore`)."""
    names = sorted({name for name, _ in routed_parameters(model)})
    known = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    model._ddp_params_and_buffers_to_ignore = sorted(known | set(names))


def reduce_expert_gradients(model: nn.Module) -> int:
    """All-reduce (mean over ranks) the gradients of the expert LoRA; returns the bytes reduced.

    A no-op outside a process group of several ranks. Through NCCL on the rank's GPU when that is
    the default backend (gloo reduces host tensors at a fraction of the speed), else through gloo.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0
    grads = [t.grad for _, t in routed_parameters(model) if isinstance(t, nn.Parameter) and t.grad is not None]
    on_gpu = dist.get_backend() == "nccl" and torch.cuda.is_available()
    world, total = dist.get_world_size(), 0
    for chunk in _chunks(grads):
        # pinned where it goes to the GPU: a pageable source makes the copy synchronous and staged
        flat = torch.empty(sum(g.numel() for g in chunk), dtype=chunk[0].dtype, pin_memory=on_gpu)
        torch.cat([g.reshape(-1) for g in chunk], out=flat)
        buffer = flat.to(f"cuda:{torch.cuda.current_device()}", non_blocking=True) if on_gpu else flat
        dist.all_reduce(buffer)
        flat.copy_(buffer).div_(world)
        offset = 0
        for g in chunk:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        total += flat.numel() * flat.element_size()
    return total


def _chunks(tensors: list[torch.Tensor]):
    chunk, size = [], 0
    for t in tensors:
        chunk.append(t)
        size += t.numel() * t.element_size()
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_host_cores: list[int] | None = None  # the process's affinity before `pin_to_rank_cores` narrowed it


def rank_cores() -> list[int] | None:
    """This local rank's share of the host cores the process was started with (contiguous, equal
    shares), or None when it is the only process on the host (`LOCAL_WORLD_SIZE`, which torchrun
    and accelerate set)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_world <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cores = _host_cores if _host_cores is not None else sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // local_world)
    return cores[local_rank * share:(local_rank + 1) * share] or cores[-share:]


def pin_to_rank_cores() -> int | None:
    """Restrict this process to `rank_cores()` before the engine's pool starts (its workers pin
    within the affinity, one per physical core of it); returns how many CPUs it has then, or None
    when nothing was split."""
    global _host_cores
    cores = rank_cores()
    if cores is None:
        return None
    if _host_cores is None:
        _host_cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    return len(cores)
