"""What a gradient-checkpointed layer's first expert forward keeps for its recomputation.

Gradient checkpointing (TRL's default) runs a checkpointed decoder layer's forward twice: once
without keeping activations and once more inside backward. The second CPU expert forward is pure
waste when the first one keeps what the backward needs: per layer and micro-batch the routing ids,
the output `y` (on the caller's device) and the engine's `ExpertActivations` (host memory,
`T·k·2I` BF16 values plus the LoRA intermediates). `KeptForwards` is one layer's queue of them;
`ActivationBudget` caps their host bytes over the whole model (`KTConfig.max_kept_activations_gb`):
a forward that would exceed it keeps nothing, and its recomputation calls the engine again.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class KeptForward:
    """A checkpointed layer's first-forward result, waiting for its recomputation."""

    ids: torch.Tensor  # [T, k], host
    y: torch.Tensor  # [T, H], on the caller's device (host memory is the scarcer)
    saved: Any  # ExpertActivations, host
    host_bytes: int


def host_bytes(*tensors) -> int:
    """Bytes of the host tensors among `tensors` (None and device tensors count 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None and t.device.type == "cpu")


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


class KeptForwards:
    """One layer's kept first forwards, newest taken first (backward runs in reverse).

    Args:
        name: The layer's qualified name, for messages.
        max_pending: How many may wait at once (micro-batches forwarded before one backward);
            beyond it the oldest is dropped with a warning.
        budget: The model's `ActivationBudget`.
    """

    def __init__(self, name: str, *, max_pending: int, budget: ActivationBudget) -> None:
        self.name = name
        self.max_pending = max_pending
        self.budget = budget
        self._entries: collections.deque[KeptForward] = collections.deque()

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, ids: torch.Tensor, y: torch.Tensor, saved) -> bool:
        """Keep copies of `ids` and `y` and the caller-owned `saved`; False if the budget declines."""
        nbytes = host_bytes(ids, y, *saved.as_tuple())
        if len(self._entries) >= self.max_pending:
            self._release(self._entries.popleft())
            logger.warning(
                "%s: more than %d checkpointed forwards without a backward; dropped the oldest kept activations "
                "(its backward will recompute). Raise KTConfig(max_pending_activations=...) if this is intended.",
                self.name, self.max_pending,
            )
        if not self.budget.reserve(nbytes):
            return False
        self._entries.append(KeptForward(ids.detach().clone(), y.detach().clone(), saved, nbytes))
        return True

    def take(self, ids: torch.Tensor) -> KeptForward | None:
        """The newest kept forward routed exactly like `ids`, removed from the queue; None if none is."""
        for i in range(len(self._entries) - 1, -1, -1):
            entry = self._entries[i]
            if entry.ids.shape == ids.shape and torch.equal(entry.ids, ids):
                del self._entries[i]
                self._release(entry)
                return entry
        return None

    def clear(self) -> None:
        while self._entries:
            self._release(self._entries.popleft())

    def _release(self, entry: KeptForward) -> None:
        self.budget.release(entry.host_bytes)
