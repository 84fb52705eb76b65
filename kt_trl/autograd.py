"""One MoE layer's routed experts, forward and backward, as differentiable torch ops.

`RoutedExpertsFunction` is the engine's forward and backward over CPU tensors, asking the runner
(`experts.EngineRunner`) for the engine work. A caller on a CUDA device reaches it through
`ToHost` and `ToDevice` (the runner's `staging.HostStaging`: pinned buffers and CUDA events), so
that the engine's backward is a CPU node of the autograd graph: it runs on the thread that called
`backward()`, not on the device's autograd thread (which stays free for GPU work meanwhile).
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


class ToHost(torch.autograd.Function):
    """`x` (as BF16), `w`, `ids` and the LoRA factors (as FP32, strides kept) from a CUDA device to the
    CPU; their gradients back to their devices and dtypes."""

    @staticmethod
    def forward(ctx, staging, x, w, ids, *factors):
        ctx.staging = staging
        ctx.metas = [(t.device, t.dtype) for t in (x, w, ids, *factors)]
        x_cpu, w_cpu, ids_cpu = staging.to_host(x.detach().to(torch.bfloat16), w.detach(), ids.detach())
        ctx.mark_non_differentiable(ids_cpu)
        return (x_cpu, w_cpu, ids_cpu, *(f.detach().to(device="cpu", dtype=torch.float32) for f in factors))

    @staticmethod
    def backward(ctx, *grads):
        return (None, *(None if g is None else ctx.staging.to_device(g, device=device, dtype=dtype)
                        for g, (device, dtype) in zip(grads, ctx.metas)))


class ToDevice(torch.autograd.Function):
    """The engine's output `y` (CPU) to the caller's device and dtype; its gradient back as BF16."""

    @staticmethod
    def forward(ctx, staging, y, device, dtype):
        ctx.staging = staging
        return staging.to_device(y, device=device, dtype=dtype)

    @staticmethod
    def backward(ctx, dy):
        (dy_cpu,) = ctx.staging.to_host(dy.detach().to(torch.bfloat16))
        return None, dy_cpu, None, None


class RoutedExpertsFunction(torch.autograd.Function):
    """Autograd over the engine: gradients to hidden states, routing weights and expert LoRA A/B.

    Inputs (CPU): runner, `Phase`, the device its output goes to (engine outputs bound for CUDA are
    written into pinned buffers), x [T, H], w [T, k], ids [T, k], (scale_gate_up, scale_down), then
    A_gate_up [E, r, H], B_gate_up [E, 2I, r], A_down [E, r, I], B_down [E, H, r] (or None).
    """

    @staticmethod
    def forward(ctx, runner, phase, device, x, w, ids, scales, a_gate_up, b_gate_up, a_down, b_down):
        x_bf16, w_in, ids_in = x.detach().to(torch.bfloat16), w.detach(), ids.detach()
        lora_gate_up = _lora_for_engine(a_gate_up, b_gate_up, scales[0])
        lora_down = _lora_for_engine(a_down, b_down, scales[1])
        y, saved = runner.forward(phase, x_bf16, ids_in, w_in, lora_gate_up, lora_down, device=device)
        ctx.runner, ctx.loras, ctx.device = runner, (lora_gate_up, lora_down), device
        ctx.dtypes = [t.dtype if t is not None else None for t in (x, w, a_gate_up, b_gate_up, a_down, b_down)]
        if phase is not Phase.INFERENCE:
            # Inside a non-reentrant checkpointed layer the first forward's saved tensors are dropped
            # and the node's backward receives the recomputation's instead: those the runner kept.
            ctx.save_for_backward(x_bf16, w_in, ids_in, *saved.as_tuple())
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, ids, *rest = ctx.saved_tensors
        need = ctx.needs_input_grad
        lora_gate_up, lora_down = ctx.loras
        dx, dw, g_gate_up, g_down = ctx.runner.backward(
            dy.detach().to(torch.bfloat16).contiguous(), x, ids, w, ExpertActivations(*rest),
            lora_gate_up=lora_gate_up, lora_down=lora_down, need_dx=need[3], need_dw=need[4],
            need_lora_grads=any(need[7:]), empty=ctx.runner.staging.empty_for(ctx.device),
        )
        grads = [dx, dw, *(g_gate_up or (None, None)), *(g_down or (None, None))]
        out = [g.to(dtype) if g is not None and dtype is not None and n else None
               for g, dtype, n in zip(grads, ctx.dtypes, (need[3], need[4], *need[7:]))]
        return (None, None, None, out[0], out[1], None, None, *out[2:])
