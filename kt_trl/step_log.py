"""Where the training steps' time goes, in the Trainer's logs.

Each training log line (the ones with `loss`, every `logging_steps`) gets, averaged over the optimizer
steps since the previous line:

- `kt_cpu_experts_s`: seconds a step spends in the CPU engine, the routed experts' forward and backward
  (what `KTConfig.threads`, `expert_format` and `gpu_experts` change);
- `kt_transfer_s`, where the engine's layers train beside a CUDA device: the device time of the copies
  between it and the host, plus host time copying engine outputs into pinned buffers.

The rest of the step (`train_runtime` per step minus these) is the accelerator's work and waiting for
it. Lines where no layer ran on the engine get neither key.
"""

from __future__ import annotations

from torch import nn
from transformers import TrainerCallback

from .experts import expert_counters


class StepTimeLog(TrainerCallback):
    """Adds the engine's share of the steps since the last call to a training log (module docstring).

    As a callback it starts counting where training starts (a resumed run at the checkpoint's step)."""

    def __init__(self) -> None:
        self._last: dict[str, float] | None = None
        self._step = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._last = expert_counters(model) if model is not None else None
        self._step = state.global_step

    def add_to(self, logs: dict[str, float], model: nn.Module, global_step: int) -> None:
        if "loss" not in logs:  # evaluation and end-of-training summaries
            return
        now = expert_counters(model)
        last, steps = self._last, global_step - self._step
        self._last, self._step = now, global_step
        if steps <= 0:
            return
        delta = {key: now[key] - (last[key] if last is not None else 0) for key in now}
        if not delta["forward_calls"] and not delta["backward_calls"]:
            return
        logs["kt_cpu_experts_s"] = round((delta["forward_seconds"] + delta["backward_seconds"]) / steps, 4)
        if delta["to_host_calls"] or delta["to_device_calls"]:
            copies = delta["pin_copy_seconds"] + delta["d2h_gpu_seconds"] + delta["h2d_gpu_seconds"]
            logs["kt_transfer_s"] = round(copies / steps, 4)
