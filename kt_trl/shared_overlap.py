"""The GPU computes a block's shared experts while the CPU engine computes its routed experts.

[NOTE] DeepSeek-V2/V3, Kimi-K2 and GLM-4.5 blocks call `experts(x)` and then `shared_experts(x)` on
the same hidden states, and the shared experts do not depend on the routed result. So the expert op
starts the engine on the worker thread (`kt_trl.worker`), computes the shared experts in the
meantime (their kernels run on the GPU while the engine runs on the CPU) and stashes the result;
the block's own `shared_experts(residuals)` call, bound here per instance, returns the stash when it
gets those same hidden states, and computes as usual otherwise. Opt-in
(`KTConfig(overlap_shared_experts=True)`): the shared experts take about a thousandth of the
engine's time per layer on an H200 (DeepSeek-V3, 8192 tokens: ~0.7 TFLOP against the engine's
2.6 s; measured, the gain was within run-to-run noise),
and on a CPU-only run both would compete for the same cores. Blocks that call their shared experts
first (Qwen2-MoE, ERNIE, HunYuan) have already queued them on the GPU by the time the experts run:
nothing to reorder there.
"""

from __future__ import annotations

import types

import torch
from torch import nn


class SharedExpertsAhead:
    """Computes one block's shared experts ahead of the block's own call, and hands the result over.

    Args:
        module: The block's shared-experts module (its forward is bound per instance).

    Attributes:
        hits: Calls of the module answered from a result computed ahead.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._forward = module.forward
        self._stash = None
        self.hits = 0
        module.forward = types.MethodType(_forward_or_stash, module)
        module._kt_shared_ahead = self

    @property
    def usable(self) -> bool:
        """Hooks on the module would run at its call, not at the computation ahead: then it is not used."""
        return not (self.module._forward_hooks or self.module._forward_pre_hooks)

    def compute(self, hidden_states: torch.Tensor, grad_enabled: bool) -> None:
        """Run the shared experts on `hidden_states [T, H]` now (with autograd as the caller had it)."""
        with torch.set_grad_enabled(grad_enabled):
            out = self._forward(hidden_states)
        self._stash = (hidden_states, hidden_states._version, out)

    def discard(self) -> None:
        """Drop a result nobody took (a checkpoint recomputation may stop before the block's call)."""
        self._stash = None

    def take(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The stashed output if `hidden_states` are the same values it was computed from (any shape)."""
        stash, self._stash = self._stash, None
        if stash is None:
            return None
        x, version, out = stash
        same = (hidden_states.data_ptr() == x.data_ptr() and hidden_states.numel() == x.numel()
                and hidden_states.shape[-1] == x.shape[-1] and hidden_states.dtype == x.dtype
                and hidden_states.device == x.device and hidden_states._version == version)
        if not same:
            return None
        self.hits += 1
        return out.view(*hidden_states.shape[:-1], out.shape[-1])


def _forward_or_stash(self: nn.Module, hidden_states, *args, **kwargs):
    ahead = self._kt_shared_ahead
    out = ahead.take(hidden_states) if not args and not kwargs else None
    return out if out is not None else ahead._forward(hidden_states, *args, **kwargs)
