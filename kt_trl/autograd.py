"""One MoE layer's routed experts, forward and backward, as one differentiable torch op.

`RoutedExpertsFunction` moves the call's tensors between the caller's device and the CPU engine
(through the runner's `staging.HostStaging`: pinned buffers and CUDA events when the caller is on a
GPU) and asks the runner (`experts.EngineRunner`) for the engine work.
"""

from __future__ import annotations

import torch

from .checkpointing import Phase
from .engine import ExpertActivations, ExpertLoRA


def _lora_for_engine(factor_a, factor_b, scale):
    """`ExpertLoRA` the engine accepts (CPU, FP32, contiguous A) over detached factors, or None."""
    if factor_a is None:
        return None
    a = factor_a.detach().to(device="cpu", dtype=torch.float32).contiguous()
    b = factor_b.detach().to(device="cpu", dtype=torch.float32)  # keeps PEFT's permuted strides
    return ExpertLoRA(A=a, B=b, scale=scale)


def lora_arguments(lora_gate_up: ExpertLoRA | None, lora_down: ExpertLoRA | None):
    """`((scale_gate_up, scale_down), [A_gu, B_gu, A_d, B_d])` as `RoutedExpertsFunction` takes them."""
    scales, factors = [0.0, 0.0], [None] * 4
    for slot, lora in enumerate((lora_gate_up, lora_down)):
        if lora is not None:
            scales[slot], factors[2 * slot], factors[2 * slot + 1] = float(lora.scale), lora.A, lora.B
    return tuple(scales), factors


class RoutedExpertsFunction(torch.autograd.Function):
    """Autograd over the engine: gradients to hidden states, routing weights and expert LoRA A/B.

    Inputs: runner, `Phase`, x [T, H], w [T, k], ids [T, k], (scale_gate_up, scale_down), then
    A_gate_up [E, r, H], B_gate_up [E, 2I, r], A_down [E, r, I], B_down [E, H, r] (or None).
    """

    @staticmethod
    def forward(ctx, runner, phase, x, w, ids, scales, a_gate_up, b_gate_up, a_down, b_down):
        x_cpu, w_cpu, ids_cpu = runner.staging.to_host(x.detach().to(torch.bfloat16), w.detach(), ids.detach())
        lora_gate_up = _lora_for_engine(a_gate_up, b_gate_up, scales[0])
        lora_down = _lora_for_engine(a_down, b_down, scales[1])
        y, saved = runner.forward(phase, x_cpu, ids_cpu, w_cpu, lora_gate_up, lora_down, device=x.device, dtype=x.dtype)
        ctx.runner, ctx.loras = runner, (lora_gate_up, lora_down)
        ctx.metas = [(t.device, t.dtype) if t is not None else None for t in (x, w, a_gate_up, b_gate_up, a_down, b_down)]
        if phase is not Phase.INFERENCE:
            # Inside a non-reentrant checkpointed layer the first forward's saved tensors are dropped
            # and the node's backward receives the recomputation's instead: those the runner kept.
            ctx.save_for_backward(x_cpu, w_cpu, ids_cpu, *saved.as_tuple())
        return y

    @staticmethod
    def backward(ctx, dy):
        x_cpu, w, ids, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        lora_gate_up, lora_down = ctx.loras
        staging = ctx.runner.staging
        (dy_cpu,) = staging.to_host(dy.detach().to(torch.bfloat16))
        dx, dw, g_gate_up, g_down = ctx.runner.backward(
            dy_cpu, x_cpu, ids, w, ExpertActivations(*rest), lora_gate_up=lora_gate_up, lora_down=lora_down,
            need_dx=need[2], need_dw=need[3], need_lora_grads=any(need[6:]),
            empty=staging.empty_for(ctx.metas[0][0]),
        )
        grads = [dx, dw, *(g_gate_up or (None, None)), *(g_down or (None, None))]
        out = [
            staging.to_device(g, device=meta[0], dtype=meta[1]) if g is not None and meta is not None and n else None
            for g, meta, n in zip(grads, ctx.metas, (need[2], need[3], *need[6:]))
        ]
        return (None, None, out[0], out[1], None, None, *out[2:])
