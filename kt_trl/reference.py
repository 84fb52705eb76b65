"""Pure-PyTorch routed experts: the test oracle and the benchmark baseline.

Computes, for one MoE layer with E experts, hidden size H, expert intermediate size I and top-k routing,

    y[t] = sum_j w[t, j] * Expert_{id[t, j]}(x[t])
    Expert_e(x) = down_e(act(gate_e(x), up_e(x)))
    p_e(x) = x W_e^T + s * (x A_e^T) B_e^T (+ bias_e)

with act(g, u) = silu(g) * u, or gpt-oss's clamped SwiGLU
(u' + 1) * g' * sigmoid(alpha * g'), g' = min(g, limit), u' = clamp(u, -limit, limit),

with the transformers 5 layouts ``gate_up [E, 2I, H]`` (gate rows, then up rows) and ``down [E, H, I]``.
An id equal to E (the "not on this rank" sentinel) contributes nothing. Every operation is a plain
differentiable torch op, so ``torch.autograd`` gives the reference gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expert_lora_delta(A: torch.Tensor, B: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * (x A^T) B^T`` for one expert. ``A [r, in]``, ``B [out, r]``, ``x [n, in]``."""
    return scale * (x @ A.t()) @ B.t()


def gated_activation(g: torch.Tensor, u: torch.Tensor, activation: str = "silu", alpha: float = 1.702,
                     limit: float = 7.0) -> torch.Tensor:
    """``act(g, u)``: ``"silu"`` (SwiGLU) or ``"clamped_swiglu"`` (gpt-oss)."""
    if activation == "silu":
        return F.silu(g) * u
    if activation == "clamped_swiglu":
        g = g.clamp(max=limit)
        return (u.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
    raise ValueError(f"unknown activation {activation!r}; use 'silu' or 'clamped_swiglu'")


def routed_experts_reference(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    lora_gate_up: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    lora_down: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    dtype: torch.dtype = torch.float64,
    activation: str = "silu",
    alpha: float = 1.702,
    limit: float = 7.0,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed experts in ``dtype``.

    Args:
        x: ``[T, H]`` hidden states.
        ids: ``[T, k]`` expert ids in ``[0, E]`` (E = skip).
        weights: ``[T, k]`` routing weights.
        gate_up: ``[E, 2I, H]``; down: ``[E, H, I]``.
        lora_gate_up / lora_down: ``(A [E, r, in], B [E, out, r], scale)`` or None.
        activation, alpha, limit: see :func:`gated_activation`.
        gate_up_bias / down_bias: ``[E, 2I]`` (gate then up) and ``[E, H]``, or None.
    Returns:
        ``[T, H]`` in ``dtype``.
    """
    num_experts = gate_up.shape[0]
    inter = down.shape[2]
    xd = x.to(dtype)
    y = torch.zeros(x.shape[0], down.shape[1], dtype=dtype, device=x.device)
    for e in range(num_experts):
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            continue
        xe = xd[token]
        gu = xe @ gate_up[e].to(dtype).t()
        if lora_gate_up is not None:
            A, B, s = lora_gate_up
            gu = gu + expert_lora_delta(A[e].to(dtype), B[e].to(dtype), xe, s)
        if gate_up_bias is not None:
            gu = gu + gate_up_bias[e].to(dtype)
        h = gated_activation(gu[:, :inter], gu[:, inter:], activation, alpha, limit)
        out = h @ down[e].to(dtype).t()
        if down_bias is not None:
            out = out + down_bias[e].to(dtype)
        if lora_down is not None:
            A, B, s = lora_down
            out = out + expert_lora_delta(A[e].to(dtype), B[e].to(dtype), h, s)
        y = y.index_add(0, token, out * weights[token, slot].to(dtype).unsqueeze(-1))
    return y
