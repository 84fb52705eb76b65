"""Gradient checkpointing and the CPU experts: which phase a call is in, and what it keeps.

[NOTE] Gradient checkpointing (TRL's default) runs a checkpointed decoder layer's forward twice:
once without keeping activations and once more inside backward. The second CPU expert forward is
pure waste when the first one keeps what the backward needs: per layer and micro-batch the routing
ids, the output `y` and the engine's `ExpertActivations` (`T·k·2I` BF16 values plus the LoRA
intermediates; at Qwen3-30B-A3B's shape and 8192 tokens 0.2 GB per layer, 10 GB for 48 layers).
`call_phase` tells the first forward from its recomputation (`Phase`); `KeptForwards` is one
layer's queue of what first forwards kept.

Where kept activations wait, in order of preference:
  1. on the accelerator the model runs on, up to `KTConfig.max_kept_activations_gpu_gb` (default a
     quarter of its memory; out of memory there falls through to 2): host memory, which the packed
     experts mostly fill, is the scarcer of the two. They go through the staging's pinned buffers
     with a non-blocking copy, and the recomputation copies them back (a few ms per layer);
  2. in host memory, up to `KTConfig.max_kept_activations_gb` (default no limit);
  3. nowhere: the recomputation calls the engine again.
Both limits are model-wide (`ActivationBudget`).
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

from .engine import ExpertActivations
from .staging import HostStaging

logger = logging.getLogger(__name__)


class Phase(enum.Enum):
    """What one expert call is, as far as its backward is concerned."""

    TRAIN = "train"          # a forward whose backward follows (no activation reuse)
    FIRST = "first"          # a checkpointed layer's first forward: keeps what the backward needs
    RECOMPUTE = "recompute"  # that layer's recomputation inside backward: takes it back
    INFERENCE = "inference"  # no backward follows: nothing is saved


def checkpointing_requested(args) -> bool | None:
    """Whether training arguments ask for activation (gradient) checkpointing; None without arguments.

    transformers 5.25 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name
    stays an alias until v6): the new name is read first.
    """
    if args is None:
        return None
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        value = getattr(args, name, None)
        if value is not None:
            return bool(value)
    return None


def _in_backward() -> bool:
    # torch has no public "is autograd's engine running" query; the graph-task id is -1 outside
    # backward in every torch 2.x release.
    return torch._C._current_graph_task_id() != -1


def _reentrant(layer: nn.Module) -> bool:
    """Whether `layer` is checkpointed with `use_reentrant=True` (transformers binds the kwargs with partial)."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(function, "keywords", {}).get("use_reentrant", False))


def call_phase(layer: nn.Module | None, *, reuse: bool, needs_grad: bool) -> Phase:
    """The `Phase` of an expert call inside decoder `layer` (None: outside any layer).

    Args:
        layer: The decoder layer holding the experts; it tells whether it is gradient-checkpointed.
        reuse: `KTConfig.reuse_checkpointed_activations`.
        needs_grad: Whether any input of the call requires a gradient.
    """
    checkpointed = reuse and layer is not None and getattr(layer, "gradient_checkpointing", False) and layer.training
    if checkpointed:
        if _in_backward():
            return Phase.RECOMPUTE
        # reentrant checkpointing runs the first forward under no_grad
        if torch.is_grad_enabled() or _reentrant(layer):
            return Phase.FIRST
    return Phase.TRAIN if needs_grad else Phase.INFERENCE


@dataclass
class KeptForward:
    """A checkpointed layer's first-forward result, waiting for its recomputation."""

    ids: torch.Tensor  # [T, k], host
    y: torch.Tensor  # [T, H] BF16, host (pinned when bound for a CUDA device)
    saved: ExpertActivations  # on the host or the caller's accelerator
    host_bytes: int
    device_bytes: int


def nbytes(*tensors) -> int:
    """Bytes of `tensors` (None counts 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class ActivationBudget:
    """Host bytes held by kept forwards, model-wide, against an optional limit (thread-safe).

    Args:
        limit_bytes (`int`, *optional*): None for no limit.
    """

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = limit_bytes
        self.bytes = 0
        self.peak_bytes = 0
        self.declined = 0  # forwards that kept nothing for lack of budget
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> bool:
        with self._lock:
            if self.limit_bytes is not None and self.bytes + nbytes > self.limit_bytes:
                self.declined += 1
                return False
            self.bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.bytes -= nbytes


class DeviceActivationBudget(ActivationBudget):
    """`ActivationBudget` on an accelerator; with no limit given, a fraction of its total memory."""

    def __init__(self, limit_bytes: int | None = None, *, fraction: float = 0.25) -> None:
        super().__init__(limit_bytes)
        self.fraction = fraction

    def reserve_on(self, nbytes: int, device: torch.device) -> bool:
        if self.limit_bytes is None:
            self.limit_bytes = int(self.fraction * torch.cuda.get_device_properties(device).total_memory)
        return self.reserve(nbytes)


class KeptForwards:
    """One layer's kept first forwards, newest taken first (backward runs in reverse).

    Args:
        name: The layer's qualified name, for messages.
        max_pending: How many may wait at once (micro-batches forwarded before one backward);
            beyond it the oldest is dropped with a warning.
        budget: The model's host `ActivationBudget`.
        device_budget: The model's `DeviceActivationBudget`.
        staging: Moves the kept activations to the accelerator and back.
    """

    def __init__(self, name: str, *, max_pending: int, budget: ActivationBudget,
                 device_budget: DeviceActivationBudget, staging: HostStaging) -> None:
        self.name = name
        self.max_pending = max_pending
        self.budget = budget
        self.device_budget = device_budget
        self.staging = staging
        self._entries: collections.deque[KeptForward] = collections.deque()
        self._lock = threading.Lock()   # the recomputation may run on the device's autograd thread

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, ids: torch.Tensor, y: torch.Tensor, saved: ExpertActivations, device: torch.device) -> bool:
        """Keep `ids`, the caller-owned host `y` and `saved` where the budgets allow (module
        docstring; `device`: the one the layer runs on); False if neither does."""
        with self._lock:
            return self._keep(ids, y, saved, torch.device(device))

    def _keep(self, ids: torch.Tensor, y: torch.Tensor, saved: ExpertActivations, device: torch.device) -> bool:
        if len(self._entries) >= self.max_pending:
            self._release(self._entries.popleft())
            logger.warning(
                "%s: more than %d checkpointed forwards without a backward; dropped the oldest kept activations "
                "(its backward will recompute). Raise KTConfig(max_pending_activations=...) if this is intended.",
                self.name, self.max_pending,
            )
        size = nbytes(*saved.as_tuple())
        ids = ids.detach().clone()
        small = nbytes(ids, y)   # host memory whatever happens to `saved`
        on_device = (device.type == "cuda" and self.device_budget.reserve_on(size, device)
                     and self._to_device(saved, size, device))
        if on_device and self.budget.reserve(small):
            entry = KeptForward(ids, y, on_device, host_bytes=small, device_bytes=size)
        elif not on_device and self.budget.reserve(size + small):
            entry = KeptForward(ids, y, saved, host_bytes=size + small, device_bytes=0)
        else:
            if on_device:
                self.device_budget.release(size)
            return False
        self._entries.append(entry)
        return True

    def _to_device(self, saved: ExpertActivations, size: int, device: torch.device) -> ExpertActivations | None:
        """`saved` on `device`; None (budget returned) when the device is out of memory."""
        try:
            return ExpertActivations(*(
                None if t is None else self.staging.to_device(t, device=device, dtype=t.dtype)
                for t in saved.as_tuple()))
        except torch.cuda.OutOfMemoryError:
            self.device_budget.release(size)
            self.device_budget.declined += 1
            logger.warning("%s: the GPU is out of memory for kept activations; keeping them in host memory "
                           "(lower KTConfig(max_kept_activations_gpu_gb=...) to avoid this).", self.name)
            return None

    def take(self, ids: torch.Tensor) -> KeptForward | None:
        """The newest kept forward routed exactly like `ids`, removed from the queue, its
        activations back in host memory; None if none is."""
        with self._lock:
            i = next((i for i in range(len(self._entries) - 1, -1, -1)
                      if self._entries[i].ids.shape == ids.shape and torch.equal(self._entries[i].ids, ids)), None)
            if i is None:
                return None
            entry = self._entries[i]
            del self._entries[i]
            self._release(entry)
        if entry.device_bytes:
            entry.saved = self._to_host(entry.saved)
        return entry

    def _to_host(self, saved: ExpertActivations) -> ExpertActivations:
        tensors = saved.as_tuple()
        present = iter(self.staging.to_host(*(t for t in tensors if t is not None)))
        return ExpertActivations(*(None if t is None else next(present) for t in tensors))

    def clear(self) -> None:
        with self._lock:
            while self._entries:
                self._release(self._entries.popleft())

    def _release(self, entry: KeptForward) -> None:
        self.device_budget.release(entry.device_bytes)
        self.budget.release(entry.host_bytes)


def activation_budgets(config) -> tuple[ActivationBudget, DeviceActivationBudget]:
    """A model's host and accelerator budgets for kept forwards, from a `KTConfig`."""
    return (ActivationBudget(config.kept_activations_limit_bytes),
            DeviceActivationBudget(config.kept_activations_gpu_limit_bytes))
