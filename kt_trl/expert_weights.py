"""Expert weights between a family's Hugging Face layout and the engine's standard layout.

The engine runs `gate_up [2I, H]` (gate rows, then up rows) and `down [H, I]` per expert (DESIGN §1).
Most families store exactly that, stacked as `[E, 2I, H]` / `[E, H, I]`. gpt-oss stores the
transposes `[E, H, 2I]` / `[E, I, H]` with gate and up *interleaved* along 2I (`x[..., ::2]` is the
gate), plus biases; `ExpertLayout` says which, and these functions convert one expert at a time,
so a layer is never held twice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .expert_layouts import ExpertLayout


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Gate entries (even positions) first, then up (odd) along the first dimension."""
    return torch.cat([t[0::2], t[1::2]])


def _interleave(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    out = torch.empty_like(t)
    out[0::2], out[1::2] = t[:half], t[half:]
    return out


def engine_expert(layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert in the family's layout -> `(gate_up [2I, H], down [H, I])` on the CPU."""
    gate_up, down = gate_up.detach().to("cpu"), down.detach().to("cpu")
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    if layout.interleaved:
        gate_up = _deinterleave(gate_up)
    return gate_up.contiguous(), down.contiguous()


def engine_bias(layout: ExpertLayout, experts: nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate_up_bias [2I] gate then up, down_bias [H])` of one expert, FP32 on the CPU."""
    b_gu = experts.gate_up_proj_bias.detach()[expert].to("cpu", torch.float32)
    b_d = experts.down_proj_bias.detach()[expert].to("cpu", torch.float32)
    return (_deinterleave(b_gu) if layout.interleaved else b_gu).contiguous(), b_d.contiguous()


def engine_experts(layout: ExpertLayout, experts: nn.Module) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield `(gate_up [2I, H], down [H, I])` per expert in the engine's layout (CPU), with
    `(gate_up_bias [2I], down_bias [H])` appended when the family has biases."""
    for e in range(experts.gate_up_proj.shape[0]):
        weights = engine_expert(layout, experts.gate_up_proj[e], experts.down_proj[e])
        yield weights + engine_bias(layout, experts, e) if layout.bias else weights


def engine_dims(layout: ExpertLayout, experts: nn.Module) -> tuple[int, int, int]:
    """`(E, H, I)` of an experts module."""
    E, a, b = experts.gate_up_proj.shape
    return (E, a, b // 2) if layout.transposed else (E, b, a // 2)


def hf_expert(layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert from the engine's layout back to the family's: the inverse of `engine_experts`."""
    if layout.interleaved:
        gate_up = _interleave(gate_up)
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    return gate_up.contiguous(), down.contiguous()


def pack_experts(layout: ExpertLayout, experts: nn.Module):
    """An `ExpertEngine` holding the module's experts (and biases), built expert by expert."""
    from .engine import ExpertEngine

    E, H, I = engine_dims(layout, experts)
    options = {}
    if layout.act == "clamped_swiglu":
        options = {"activation": "clamped_swiglu", "alpha": float(experts.alpha), "limit": float(experts.limit)}
    with torch.no_grad():
        return ExpertEngine.from_experts(E, H, I, engine_experts(layout, experts), **options)
