"""The engine's forward and backward as one differentiable torch op.

`RoutedExpertsFunction` moves the call's tensors between the caller's device and the CPU engine
(through `staging.HostStaging`: pinned buffers and CUDA events when the caller is on a GPU) and
asks a *runner* for the engine work. `routed_experts(engine, ...)` runs an engine directly; the
trainer's runner (`experts.CPUExperts`) adds gradient-checkpointing reuse and counters.
"""

from __future__ import annotations

import torch

from .deferred_grads import gradient_targets
from .engine import ExpertActivations, ExpertEngine, ExpertLoRA
from .staging import HostStaging

# Phases of one call: inside a checkpointed layer's first forward / its recomputation in backward;
# a forward no backward follows (nothing to save); or None, a plain training forward.
FIRST, RECOMPUTE, INFERENCE = "first", "recompute", "inference"


class EngineRunner:
    """The plain runner: one engine, no checkpointing logic, LoRA gradients returned through autograd."""

    deferred = None

    def __init__(self, engine: ExpertEngine, staging: HostStaging | None = None) -> None:
        self.engine = engine
        self.staging = staging if staging is not None else HostStaging()

    def forward(self, phase, x, ids, w, lora_gate_up, lora_down, *, device, dtype, meanwhile=None):
        """`(y [T, H] as dtype on device, ExpertActivations)` for host `x [T, H]` bf16 (`meanwhile()`
        first, if given)."""
        if meanwhile is not None:
            meanwhile()
        y, saved = self.engine.forward(x, ids, w, lora_gate_up=lora_gate_up, lora_down=lora_down,
                                       save=phase != INFERENCE, empty=self.staging.empty_for(device))
        return self.staging.to_device(y, device=device, dtype=dtype), saved

    def backward(self, dy, x, ids, w, saved, **kwargs):
        return self.engine.backward(dy, x, ids, w, saved, **kwargs)


def _lora_for_engine(factor_a, factor_b, scale):
    """`ExpertLoRA` the engine accepts (CPU, FP32, contiguous A) over detached factors, or None."""
    if factor_a is None:
        return None
    a = factor_a.detach().to(device="cpu", dtype=torch.float32).contiguous()
    b = factor_b.detach().to(device="cpu", dtype=torch.float32)  # keeps PEFT's permuted strides
    return ExpertLoRA(A=a, B=b, scale=scale)


class RoutedExpertsFunction(torch.autograd.Function):
    """Autograd over the engine: gradients to hidden states, routing weights and expert LoRA A/B.

    Inputs: runner, checkpoint phase, x [T, H], w [T, k], ids [T, k], (scale_gate_up, scale_down),
    then A_gate_up [E, r, H], B_gate_up [E, 2I, r], A_down [E, r, I], B_down [E, H, r] (or None), and
    optionally `meanwhile`: work for this thread while the engine runs (`kt_trl.shared_overlap`).
    """

    @staticmethod
    def forward(ctx, runner, phase, x, w, ids, scales, a_gate_up, b_gate_up, a_down, b_down, meanwhile=None):
        x_cpu, w_cpu, ids_cpu = runner.staging.to_host(x.detach().to(torch.bfloat16), w.detach(), ids.detach())
        lora_gate_up = _lora_for_engine(a_gate_up, b_gate_up, scales[0])
        lora_down = _lora_for_engine(a_down, b_down, scales[1])
        y, saved = runner.forward(phase, x_cpu, ids_cpu, w_cpu, lora_gate_up, lora_down, device=x.device,
                                  dtype=x.dtype, meanwhile=meanwhile)
        ctx.runner, ctx.loras = runner, (lora_gate_up, lora_down)
        ctx.factors = (a_gate_up, b_gate_up, a_down, b_down)
        ctx.metas = [(t.device, t.dtype) if t is not None else None for t in (x, w, a_gate_up, b_gate_up, a_down, b_down)]
        if phase != INFERENCE:
            # Inside a non-reentrant checkpointed layer the first forward's saved tensors are dropped
            # and the node's backward receives the recomputation's instead: those the runner kept.
            ctx.save_for_backward(x_cpu, w_cpu, ids_cpu, *saved.as_tuple())
        return y

    @staticmethod
    def backward(ctx, dy):
        x_cpu, w, ids, *rest = ctx.saved_tensors
        saved = ExpertActivations(*rest)
        need = ctx.needs_input_grad
        lora_gate_up, lora_down = ctx.loras
        staging = ctx.runner.staging
        (dy_cpu,) = staging.to_host(dy.detach().to(torch.bfloat16))
        deferred = _deferral(ctx, need)
        dx, dw, g_gate_up, g_down = ctx.runner.backward(
            dy_cpu, x_cpu, ids, w, saved, lora_gate_up=lora_gate_up, lora_down=lora_down,
            need_dx=need[2], need_dw=need[3], need_lora_grads=any(need[6:]),
            empty=staging.empty_for(ctx.metas[0][0]),
            lora_grads=deferred and deferred[0], defer_lora_grads=deferred is not None,
        )
        if deferred is not None:  # the LoRA gradients reach their parameters at the end of backward
            ctx.runner.deferred.submit(deferred[1], keep_alive=(x_cpu, saved, ctx.loras, deferred[0]))
            g_gate_up = g_down = None
        grads = [dx, dw, *(g_gate_up or (None, None)), *(g_down or (None, None))]
        out = [
            staging.to_device(g, device=meta[0], dtype=meta[1]) if g is not None and meta is not None and n else None
            for g, meta, n in zip(grads, ctx.metas, (need[2], need[3], *need[6:]))
        ]
        return (None, None, out[0], out[1], None, None, *out[2:], None)


def _deferral(ctx, need):
    """`gradient_targets(...)` when the runner overlaps LoRA gradients and this backward can, else None."""
    if getattr(ctx.runner, "deferred", None) is None or not any(need[6:]):
        return None
    engine_factors = [t for lora in ctx.loras for t in ((lora.A, lora.B) if lora is not None else (None, None))]
    return gradient_targets(ctx.factors, engine_factors, need[6:])


def lora_arguments(lora_gate_up, lora_down):
    """`((scale_gate_up, scale_down), [A_gu, B_gu, A_d, B_d])` as `RoutedExpertsFunction` takes them."""
    scales, factors = [0.0, 0.0], [None] * 4
    for slot, lora in enumerate((lora_gate_up, lora_down)):
        if lora is not None:
            scales[slot], factors[2 * slot], factors[2 * slot + 1] = float(lora.scale), lora.A, lora.B
    return tuple(scales), factors


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
    scales, factors = lora_arguments(lora_gate_up, lora_down)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden_states, top_k_weights, *factors))
    return RoutedExpertsFunction.apply(EngineRunner(engine), None if needs_grad else INFERENCE, hidden_states,
                                       top_k_weights, top_k_index, scales, *factors)
