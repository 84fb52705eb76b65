"""The experts of a CPU-routed layer that also stay on the training device.

[NOTE] Where the accelerator holds only part of a model's routed experts, every CPU-routed layer
keeps its most-routed experts there as well (`DeviceShare`). One expert call then runs on both
devices at once: the routes to the device's experts go through torch (tokens sorted by expert,
grouped GEMMs, no one host synchronisation, at the point the host waits for anyway), queued right after the copies of the call's inputs to the
host, so the accelerator computes them while the engine computes the other routes; the two outputs
add. The engine sees the device's experts as the skip id E.

The engine still holds every expert: the share is a copy of some of them (BF16, the values the
engine computes with), so choosing other experts (`rebalance`, after the first optimizer step, from
the routes counted so far) needs no repacking. The share's backward recomputes its forward (cheap on
the accelerator) and differentiates it with autograd; the gradients of its LoRA slices are added
into the engine's full-size ones, so the expert-LoRA parameters keep PEFT's fused layout whatever
the split.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os

import torch

from .reference import gated_activation

logger = logging.getLogger(__name__)


def _grouped_mm(x: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows ``[offsets[g-1], offsets[g])`` of ``x [M, K]`` (BF16) times ``weight_t[g] [K, N]``
    (``offsets[-1] == M``). One grouped GEMM where torch has one for these shapes (its
    rows must be multiples of 16 bytes), else one GEMM per group (which reads the offsets: a sync)."""
    if hasattr(torch, "_grouped_mm") and not (x.shape[1] % 8 or weight_t.shape[2] % 8):
        return torch._grouped_mm(x, weight_t, offs=offsets)
    out, start = x.new_zeros(x.shape[0], weight_t.shape[2]), 0
    for group, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ weight_t[group]
        start = end
    return out


class DeviceShare:
    """Copies of some of one layer's experts on the training device, and their part of each call.

    Args:
        engine (`ExpertEngine`): The layer's engine (holds every expert; the source of the copies).
        experts (`Sequence[int]`): The expert ids to keep on `device` (at least one).
        device (`torch.device`): Where they compute.
    """

    def __init__(self, engine, experts, device) -> None:
        E, H, I = engine.dims
        count = len(experts)
        if not 0 < count <= E:
            raise ValueError(f"a device share holds 1..{E} experts, got {count}")
        self.engine, self.device = engine, torch.device(device)
        self.gate_up = torch.empty(count, 2 * I, H, dtype=torch.bfloat16, device=self.device)
        self.down = torch.empty(count, H, I, dtype=torch.bfloat16, device=self.device)
        self.has_bias = bool(engine.biases)
        if self.has_bias:
            self.gate_up_bias = torch.zeros(count, 2 * I, dtype=torch.float32, device=self.device)
            self.down_bias = torch.zeros(count, H, dtype=torch.float32, device=self.device)
        self.slot_of = torch.full((E + 1,), count, dtype=torch.long, device=self.device)  # count: not here
        self.experts = torch.empty(0, dtype=torch.long)
        self.counts = torch.zeros(E + 1, dtype=torch.long, device=self.device)  # [E]: routes skipped here
        self._lora_key, self._lora = None, None
        self.load(experts)

    @property
    def size(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [self.gate_up, self.down] + ([self.gate_up_bias, self.down_bias] if self.has_bias else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def load(self, experts) -> int:
        """Hold `experts` (as many distinct ids as the share has slots), copying only the ones it
        lacks from the engine. Returns how many were copied."""
        wanted = [int(e) for e in experts]
        if len(wanted) != self.size or len(set(wanted)) != self.size:
            raise ValueError(f"give {self.size} distinct expert ids, got {wanted}")
        if min(wanted) < 0 or max(wanted) >= self.engine.num_experts:
            raise ValueError(f"expert ids must be in [0, {self.engine.num_experts}), got {wanted}")
        slots = {e: slot for slot, e in enumerate(self.experts.tolist()) if e in set(wanted)}
        free = [slot for slot in range(self.size) if slot not in set(slots.values())]
        new = [e for e in wanted if e not in slots]
        workers = min(8, os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # the native unpack releases the GIL
            unpacked = pool.map(self.engine.unpack_expert, new)
        for e, slot, (gate_up, down) in zip(new, free, unpacked):
            self.gate_up[slot].copy_(gate_up)
            self.down[slot].copy_(down)
            if self.has_bias:
                bias_gu, bias_d = self.engine.biases[e]
                self.gate_up_bias[slot].copy_(bias_gu)
                self.down_bias[slot].copy_(bias_d)
            slots[e] = slot
        self.experts = torch.tensor(sorted(slots, key=slots.get), dtype=torch.long)  # ids by slot
        self.slot_of.fill_(self.size)
        self.slot_of[self.experts.to(self.device)] = torch.arange(self.size, device=self.device)
        self._lora_key = None
        return len(new)

    def reload(self) -> None:
        """Copy every held expert again (after the engine's weights changed, e.g. a merged adapter)."""
        held, self.experts = self.experts, torch.empty(0, dtype=torch.long)
        self.load(held.tolist())

    def engine_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` with the routes to this share's experts replaced by the engine's skip id E."""
        return torch.where(self.slot_of[ids] < self.size, self.engine.num_experts, ids)

    def count(self, ids: torch.Tensor) -> None:
        """Add the routes of ``ids [T, k]`` to the per-expert counts (on the device, no sync)."""
        flat = ids.flatten()
        self.counts.scatter_add_(0, flat, torch.ones_like(flat))

    def rebalance(self) -> tuple[int, float]:
        """Hold the most-routed experts of the counts so far. Returns ``(experts copied, share of the
        counted routes the device now takes)``."""
        counts = self.counts[:-1].cpu()
        top = torch.topk(counts, self.size, sorted=False).indices
        copied = self.load(top.tolist()) if set(top.tolist()) != set(self.experts.tolist()) else 0
        total = int(counts.sum())
        return copied, float(counts[self.experts].sum()) / total if total else 0.0

    def lora_slices(self, factors, *, refresh: bool):
        """The share's rows of ``[A_gu, B_gu, A_d, B_d]`` (None where absent) on the device, FP32.

        Copied when `refresh` (each forward that is not a recomputation: the optimizer may have
        changed them in place, and its fused kernels leave no trace in the version counters) or
        when given other tensors; the recomputation and backward of a call reuse its forward's.
        """
        key = tuple(None if f is None else f.data_ptr() for f in factors)
        if refresh or key != self._lora_key:
            rows = self.experts
            pinned = self.device.type == "cuda"
            # non-blocking from pinned memory; the pinned rows live until the next refresh, which comes
            # after host waits on events queued behind these copies
            self._lora_host = [None if f is None else f.detach().index_select(0, rows.to(f.device)).float() for f in factors]
            if pinned:
                self._lora_host = [None if t is None else t.pin_memory() for t in self._lora_host]
            self._lora = [None if t is None else t.to(self.device, non_blocking=pinned) for t in self._lora_host]
            self._lora_key = key
        return self._lora

    def forward(self, x, ids, weights, scales, lora) -> torch.Tensor | None:
        """This share's part of the layer's output, ``[T, H]`` in ``x``'s dtype, or None when no route
        goes to its experts; differentiable w.r.t. ``x``, ``weights`` and the tensors of ``lora``
        (``lora_slices``'s list).

        Reads how many routes the share has (a sync): callers queue this after the copies of the
        call's inputs to the host, which the host waits for anyway.
        """
        T, k = ids.shape
        local = self.slot_of[ids].flatten()
        order = torch.argsort(local, stable=True)
        per_slot = torch.zeros(self.size + 1, dtype=torch.long, device=local.device).scatter_add_(0, local, torch.ones_like(local))
        offsets = torch.cumsum(per_slot[:-1], 0, dtype=torch.int32)
        held = int(offsets[-1])
        if held == 0:
            return None
        rows = order[:held]  # routes to the share's experts, by expert
        xs = x.reshape(T, -1)[rows // k].to(torch.bfloat16)
        a_gu, b_gu, a_d, b_d = lora
        gu = _grouped_mm(xs, self.gate_up.transpose(1, 2), offsets)
        if a_gu is not None:
            gu = gu + scales[0] * _lora_term(xs, a_gu, b_gu, offsets)
        if self.has_bias:
            gu = gu + self.gate_up_bias[local[rows]]
        inter = self.down.shape[2]
        h = gated_activation(gu[:, :inter], gu[:, inter:], **self.engine.activation).to(torch.bfloat16)
        out = _grouped_mm(h, self.down.transpose(1, 2), offsets)
        if a_d is not None:
            out = out + scales[1] * _lora_term(h, a_d, b_d, offsets)
        if self.has_bias:
            out = out + self.down_bias[local[rows]]
        routes = out.float() * weights.flatten()[rows].unsqueeze(1)
        # back to route order, each token's k routes summed in order (index_add would be nondeterministic on CUDA)
        per_route = routes.new_zeros(T * k, routes.shape[1]).index_copy(0, rows, routes)
        return per_route.view(T, k, -1).sum(1).to(x.dtype)


def _lora_term(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``(x A_e^T) B_e^T`` per group, in BF16 (as PEFT's device path adds its delta to BF16 weights)."""
    low = _grouped_mm(x, a.to(torch.bfloat16).transpose(1, 2), offsets)
    return _grouped_mm(low, b.to(torch.bfloat16).transpose(1, 2), offsets)
