"""Expert-LoRA gradients computed on the CPU while the backward pass goes on.

[NOTE] Nothing in an expert call's backward waits for its LoRA gradients: the layers below need dx
and dw only. So the trainer's runner asks the engine for dx and dw first (`defer_lora_grads`) and
hands them to autograd at once, while a worker thread has the engine compute the LoRA gradients.
Meanwhile the autograd thread copies dx to the GPU and runs what comes next there (the attention
backward, the next checkpointed layer's recomputation); the engine's next call waits for the job
if it is still running. The gradients reach their parameters' `.grad` in a callback at the end of
the backward pass (before `backward()` returns, so gradient clipping and the optimizer see them),
not through autograd: the op returns None for them.
"""

from __future__ import annotations

import threading
import time

import torch

from . import worker
from ._native import ops


def _leaf(factor: torch.Tensor) -> torch.Tensor | None:
    """The trainable FP32 CPU parameter `factor` is (a view of), or None."""
    base = factor if factor._base is None else factor._base
    ok = base.is_leaf and base.requires_grad and base.device.type == "cpu" and base.dtype == torch.float32
    return base if ok and base.is_contiguous() else None


def gradient_targets(factors, engine_factors, needs):
    """Gradient buffers for the engine and where they go, or None when a factor is not a view of a
    trainable FP32 CPU parameter that the engine reads in place (then autograd takes the gradients).

    Args:
        factors: The op's inputs `(A_gu, B_gu, A_d, B_d)` (None without that LoRA).
        engine_factors: The tensors the engine reads for them.
        needs: Which of them need a gradient.
    Returns:
        `((dA_gu, dB_gu), (dA_d, dB_d))` views with the engine factors' strides (None where not
        needed) and `[(parameter, gradient)]` to accumulate once they are written.
    """
    views, targets = [], []
    for factor, engine_factor, need in zip(factors, engine_factors, needs):
        if factor is None or not need:
            views.append(None)
            continue
        base = _leaf(factor)
        if base is None or engine_factor.data_ptr() != factor.data_ptr() or engine_factor.stride() != factor.stride():
            return None
        grad = torch.empty_like(base)
        views.append(grad.as_strided(factor.shape, factor.stride(), factor.storage_offset() - base.storage_offset()))
        targets.append((base, grad))
    pairs = tuple(None if views[i] is None and views[i + 1] is None else (views[i], views[i + 1]) for i in (0, 2))
    return pairs, targets


class DeferredLoraGrads:
    """The process's deferred LoRA-gradient jobs (the engine has one pending slot, process-wide).

    Attributes:
        jobs: Jobs submitted.
        seconds: Worker time spent finishing them (overlapped with the rest of the backward).
    """

    def __init__(self) -> None:
        self.jobs = 0
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._pending: list = []
        self._callback_queued = False

    def submit(self, targets, keep_alive) -> None:
        """After a `defer_lora_grads` engine backward (inside autograd's backward): finish it on
        the worker, then add the gradients to `targets`' parameters at the end of the backward pass.
        `keep_alive` holds the call's tensors until the job is done."""
        with self._lock:
            self._pending.append((worker.submit(self._finish_one, keep_alive), targets))
            self.jobs += 1
            if not self._callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self.finish)
                self._callback_queued = True

    def _finish_one(self, keep_alive) -> None:
        # The job was pending when this was submitted, so it is done when finish_deferred returns
        # (here, or earlier at the engine's next call): its tensors may go with `keep_alive`.
        start = time.perf_counter()
        ops.finish_deferred()
        elapsed = time.perf_counter() - start
        with self._lock:
            self.seconds += elapsed

    def finish(self) -> None:
        """Wait for every submitted job and accumulate its gradients (the end-of-backward callback)."""
        with self._lock:
            pending, self._pending, self._callback_queued = self._pending, [], False
        ops.finish_deferred()  # whatever the worker has not started yet
        for future, targets in pending:
            future.result()
            for param, grad in targets:
                if param.grad is None:
                    param.grad = grad
                else:
                    param.grad.add_(grad)


DEFERRED = DeferredLoraGrads()
