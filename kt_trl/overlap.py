"""A micro-batch as two halves on two threads, so that the GPU and the CPU engine work at once.

[NOTE] Where some MoE layers keep their experts on the GPU (`kt_trl.placement`), a training step
alternates between the devices: the engine computes a CPU layer's experts while the GPU waits, then
the GPU computes while the engine waits. `KTSFTTrainer.training_step` instead splits the
micro-batch along its batch dimension and runs Trainer's own training step (forward and backward)
for each half on its own thread, both with the window's `num_items_in_batch`, so the two losses and
their gradients add up to the whole batch's. The engine runs one call at a time (the native
library serialises them), so while it computes one half's layer, the other half's GPU work (its
attention, its GPU-resident layers, the copies) goes on; `placement.spread` puts the GPU layers
between the CPU layers for that. Backward overlaps the same way because the engine's backward is a
CPU node of the graph (`kt_trl.autograd`): it runs on the thread that called `backward()`.

`KTConfig(overlap_halves=True)` turns it on (off by default until it is measured on a GPU host); it
applies in one process, with at least two sequences per micro-batch, with `num_items_in_batch`
known (trl's SFT loss divides by it) and without the router's auxiliary loss (trl's default for MoE
models: a mean over the micro-batch's routes, which two halves do not add up to;
`SFTConfig(router_aux_loss_coef=0.0)` turns it off). PEFT's expert LoRA on a GPU layer
swaps in a parametrization while it runs, so those layers' expert forwards run one at a time
(`serialize_forward`).
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import nn

# One GPU-resident experts forward at a time, over the model: PEFT's ParamWrapper registers a parametrization
# on the experts module for the call, under torch's process-wide parametrization cache.
_DEVICE_EXPERTS_LOCK = threading.RLock()


def serialize_forward(module: nn.Module) -> None:
    """Make `module`'s forward run under the lock of GPU-resident expert forwards (idempotent)."""
    if getattr(module, "_kt_serialized", False):
        return
    forward = module.forward

    @functools.wraps(forward)
    def locked(*args, **kwargs):
        with _DEVICE_EXPERTS_LOCK:
            return forward(*args, **kwargs)

    module.forward = locked
    module._kt_serialized = True


def split_batch(inputs: dict) -> tuple[dict, dict] | None:
    """`inputs` as two halves along the batch dimension (every tensor's first), or None when they have
    fewer than two rows or tensors of different first sizes."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1 or (rows := sizes.pop()) < 2:
        return None
    half = rows // 2

    def take(rows_slice):
        return {k: v[rows_slice] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in inputs.items()}

    return take(slice(0, half)), take(slice(half, rows))


def use_halves(trainer, num_items_in_batch) -> bool:
    """Whether `trainer`'s step runs in halves (module docstring)."""
    if trainer.kt_config is None or not trainer.kt_config.overlap_halves:
        return False
    if num_items_in_batch is None or getattr(trainer, "aux_loss_enabled", False):
        return False
    return not (trainer.accelerator.num_processes > 1 or trainer.args.n_gpu > 1 or trainer.is_deepspeed_enabled
                or trainer.is_fsdp_enabled)


def in_halves(step, halves: tuple[dict, dict], device: torch.device) -> torch.Tensor:
    """`step(half)` for both halves at once, the second on a worker thread; the sum of their losses."""
    losses, errors = [None, None], [None, None]

    def run(i: int) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            losses[i] = step(halves[i])
        except BaseException as error:  # re-raised on the caller's thread
            errors[i] = error

    worker = threading.Thread(target=run, args=(1,), name="kt_trl_half", daemon=True)
    worker.start()
    run(0)
    worker.join()
    for error in errors:
        if error is not None:
            raise error
    return losses[0] + losses[1]
