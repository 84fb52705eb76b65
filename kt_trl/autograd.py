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
    With a `runner.share` (`kt_trl.device_share`), its experts' routes are computed on the device
    while the engine computes the others.
    """

    @staticmethod
    def forward(ctx, runner, phase, x, w, ids, scales, a_gate_up, b_gate_up, a_down, b_down):
        share = runner.share
        x, w, ids = x.detach(), w.detach(), ids.detach()
        lora_gate_up = _lora_for_engine(a_gate_up, b_gate_up, scales[0])
        lora_down = _lora_for_engine(a_down, b_down, scales[1])
        on_device = []

        def share_forward():  # queued behind the copies to the host: runs while the engine does
            if share is not None:
                if phase is not Phase.RECOMPUTE:
                    share.count(ids)
                factors = share.lora_slices(_factors(lora_gate_up, lora_down), refresh=phase is not Phase.RECOMPUTE)
                on_device.append(share.forward(x, ids, w, scales, factors))

        engine_ids = ids if share is None else share.engine_ids(ids)
        x_cpu, w_cpu, ids_cpu = runner.staging.to_host(x.to(torch.bfloat16), w, engine_ids, meanwhile=share_forward)
        y, saved = runner.forward(phase, x_cpu, ids_cpu, w_cpu, lora_gate_up, lora_down, device=x.device, dtype=x.dtype)
        if on_device and on_device[0] is not None:
            y = y + on_device[0]
        ctx.runner, ctx.loras, ctx.share, ctx.scales = runner, (lora_gate_up, lora_down), share, scales
        ctx.metas = [(t.device, t.dtype) if t is not None else None for t in (x, w, a_gate_up, b_gate_up, a_down, b_down)]
        if phase is not Phase.INFERENCE:
            # Inside a non-reentrant checkpointed layer the first forward's saved tensors are dropped
            # and the node's backward receives the recomputation's instead: those the runner kept.
            saved = saved.as_tuple()
            ctx.engine_saved = len(saved)
            ctx.save_for_backward(x_cpu, w_cpu, ids_cpu, *saved, *((x, w, ids) if share is not None else ()))
        return y

    @staticmethod
    def backward(ctx, dy):
        x_cpu, w, ids, *rest = ctx.saved_tensors
        saved, on_device = rest[:ctx.engine_saved], rest[ctx.engine_saved:]
        need = ctx.needs_input_grad
        lora_gate_up, lora_down = ctx.loras
        staging = ctx.runner.staging
        share_grads = []

        def share_backward():  # queued behind the copy of dY to the host: runs while the engine does
            if ctx.share is not None:
                share_grads.append(_share_backward(ctx.share, *on_device, dy, ctx.scales,
                                                   _factors(lora_gate_up, lora_down), need[2], need[3], any(need[6:])))

        (dy_cpu,) = staging.to_host(dy.detach().to(torch.bfloat16), meanwhile=share_backward)
        dx, dw, g_gate_up, g_down = ctx.runner.backward(
            dy_cpu, x_cpu, ids, w, ExpertActivations(*saved), lora_gate_up=lora_gate_up, lora_down=lora_down,
            need_dx=need[2], need_dw=need[3], need_lora_grads=any(need[6:]),
            empty=staging.empty_for(ctx.metas[0][0]),
        )
        grads = [dx, dw, *(g_gate_up or (None, None)), *(g_down or (None, None))]
        if share_grads:
            share_dx, share_dw, share_lora = share_grads[0]
            share_lora.add_to(grads[2:], ctx.share.experts)
        out = [
            staging.to_device(g, device=meta[0], dtype=meta[1]) if g is not None and meta is not None and n else None
            for g, meta, n in zip(grads, ctx.metas, (need[2], need[3], *need[6:]))
        ]
        if share_grads:
            out[0] = out[0] + share_dx if share_dx is not None else out[0]
            out[1] = out[1] + share_dw if share_dw is not None else out[1]
        return (None, None, out[0], out[1], None, None, *out[2:])


def _factors(lora_gate_up: ExpertLoRA | None, lora_down: ExpertLoRA | None) -> list:
    """``[A_gu, B_gu, A_d, B_d]`` of the engine's LoRA views (None where absent)."""
    return [t for lora in (lora_gate_up, lora_down) for t in ((lora.A, lora.B) if lora is not None else (None, None))]


class _HostGradients:
    """Gradients of a share's LoRA slices on their way to the host (pinned copies and one event)."""

    def __init__(self, grads: list) -> None:
        self._event, self.grads = None, grads
        if any(g is not None and g.is_cuda for g in grads):
            self.grads = [None if g is None else torch.empty(g.shape, dtype=g.dtype, pin_memory=True).copy_(g, non_blocking=True)
                          for g in grads]
            self._event = torch.cuda.Event()
            self._event.record()

    def add_to(self, full: list, experts: torch.Tensor) -> None:
        """``full[i][experts] += grads[i]`` (the engine's full-size LoRA gradients, on the CPU)."""
        if self._event is not None:
            self._event.synchronize()
        for target, grad in zip(full, self.grads):
            if target is not None and grad is not None:
                target.index_add_(0, experts, grad.to(target.dtype))


def _share_backward(share, x, w, ids, dy, scales, factors, need_dx: bool, need_dw: bool, need_lora: bool):
    """``(dx | None, dw | None, _HostGradients)`` of a share's part of the call: its forward again
    (it kept nothing), differentiated by autograd."""
    slices = share.lora_slices(factors, refresh=False)
    with torch.enable_grad():
        x = x.detach().requires_grad_(need_dx)
        w = w.detach().requires_grad_(need_dw)
        lora = [None if t is None else t.detach().requires_grad_(need_lora) for t in slices]
        y = share.forward(x, ids, w, scales, lora)
        if y is None:  # no route to the share's experts
            return None, None, _HostGradients([])
        inputs = [t for t in (x, w, *lora) if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, inputs, dy) if inputs else ())
    dx = next(grads) if need_dx else None
    dw = next(grads) if need_dw else None
    lora_grads = [next(grads) if t is not None and need_lora else None for t in lora]
    return dx, dw, _HostGradients(lora_grads)
