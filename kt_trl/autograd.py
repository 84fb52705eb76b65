"""``routed_experts``: the engine's forward and backward as one differentiable torch op."""

from __future__ import annotations

import torch

from .engine import ExpertActivations, ExpertEngine, ExpertLoRA


def _lora_on_cpu(A, B, scale) -> ExpertLoRA | None:
    if A is None:
        return None
    A_cpu = A.detach().to(device="cpu", dtype=torch.float32).contiguous()
    B_cpu = B.detach().to(device="cpu", dtype=torch.float32)   # keeps B's strides when already CPU fp32
    return ExpertLoRA(A_cpu, B_cpu, scale)


class RoutedExpertsFunction(torch.autograd.Function):
    """Inputs: engine, x [T, H], ids [T, k], weights [T, k], then (A, B, scale) for gate_up and down."""

    @staticmethod
    def forward(ctx, engine: ExpertEngine, x, ids, weights, A_gu, B_gu, s_gu, A_d, B_d, s_d):
        x_cpu = x.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        lgu, ld = _lora_on_cpu(A_gu, B_gu, s_gu), _lora_on_cpu(A_d, B_d, s_d)
        y, saved = engine.forward(x_cpu, ids, weights, lora_gate_up=lgu, lora_down=ld, save=True)
        ctx.engine, ctx.lgu, ctx.ld = engine, lgu, ld
        ctx.x_meta = (x.device, x.dtype)
        ctx.w_meta = (weights.device, weights.dtype)
        ctx.ab_meta = [(t.device, t.dtype) if t is not None else None for t in (A_gu, B_gu, A_d, B_d)]
        ctx.save_for_backward(x_cpu, ids, weights, *saved.as_tuple())
        return y.to(device=x.device, dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x_cpu, ids, weights, gu, lgu_saved, ld_saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = grad_output.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()
        dx, dw, g_gu, g_d = ctx.engine.backward(
            dy, x_cpu, ids, weights, ExpertActivations(gu, lgu_saved, ld_saved),
            lora_gate_up=ctx.lgu, lora_down=ctx.ld, need_dx=need[1], need_dw=need[3],
            need_lora_grads=any(need[4:6]) or any(need[7:9]))
        out = [None] * 10
        if dx is not None:
            out[1] = dx.to(*ctx.x_meta)
        if dw is not None:
            out[3] = dw.to(*ctx.w_meta)
        for slot, grads in ((4, g_gu), (7, g_d)):
            if grads is None:
                continue
            for i, g in enumerate(grads):
                meta = ctx.ab_meta[(slot - 4) // 3 * 2 + i]
                if need[slot + i] and meta is not None:
                    out[slot + i] = g.to(*meta)
        return tuple(out)


def routed_experts(engine: ExpertEngine, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, *, lora_gate_up: ExpertLoRA | None = None,
                   lora_down: ExpertLoRA | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer, differentiable w.r.t. the hidden states, the routing
    weights and the LoRA factors.

    Args:
        engine (`ExpertEngine`): the layer's packed experts.
        hidden_states (`torch.Tensor`): ``[T, H]``, any device and float dtype.
        top_k_index (`torch.Tensor`): ``[T, k]`` expert ids (``E`` = skip).
        top_k_weights (`torch.Tensor`): ``[T, k]`` final routing weights.
        lora_gate_up, lora_down (`ExpertLoRA`, *optional*): expert LoRA; ``A`` and ``B`` may be
            views of trainable parameters, which then receive gradients.
    Returns:
        `torch.Tensor`: ``[T, H]`` in the dtype and on the device of ``hidden_states``.
    """
    gu = (lora_gate_up.A, lora_gate_up.B, lora_gate_up.scale) if lora_gate_up is not None else (None, None, 0.0)
    d = (lora_down.A, lora_down.B, lora_down.scale) if lora_down is not None else (None, None, 0.0)
    return RoutedExpertsFunction.apply(engine, hidden_states, top_k_index, top_k_weights, *gu, *d)
