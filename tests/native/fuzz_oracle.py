"""Float64 reference results of one layer call, with an error allowance that survives cancellation.

The suite's bound (moe_case.REL_TOL, norm-wise relative) holds for its well-conditioned cases. A
fuzzer also draws ill-conditioned ones: a dw that is a dot product of 5 terms summing to nearly 0,
a rank-1 LoRA whose dA_gu hangs on one such dot, three tokens' contributions to one expert's dA
that nearly cancel. There the engine's BF16 roundings are large relative to the result, and no
relative bound holds. The allowance is

    REL_TOL * |magnitude| + SENSITIVITY_FACTOR * |sensitivity|

- magnitude: every output is a sum over routes (t, j); the sum of the terms' absolute values
  (route_magnitudes), and for dw[t, j] = dy[t] . out_tj the sum of |dy| |out| (cancellation
  between routes, and in dw's dot product). Computed only for an output that fails the plain
  bound with the reference's own norm, since it costs one reference call per route.
- sensitivity: the spread of the reference over inputs scaled by ``1 + d``, ``|d| <= 2^-8``
  random (cancellation inside a route: the inner dot products of a rank-1 LoRA).

A wrong layout, id or stride gives an error of the order of the result itself, far above both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kt_trl.reference import routed_experts_reference

from .moe_case import BF16_UNIT, REL_TOL

# The engine rounds to BF16 about four times along a path (gate/up, h, dGU, the output), one
# perturbation of the inputs stands for one rounding: 4 roundings, times 2 for the spread of three
# random draws.
SENSITIVITY_FACTOR = 8.0
PERTURBATIONS = 4


@dataclass
class LayerCall:
    """One call's inputs as the engine reads them (values, not layouts), for the reference."""

    gate_up: torch.Tensor                 # [E, 2I, H], the packed BF16 values
    down: torch.Tensor                    # [E, H, I]
    x: torch.Tensor                       # [T, H], the BF16 values the engine reads
    ids: torch.Tensor                     # [T, k]
    w: torch.Tensor                       # [T, k]
    activation: str = "silu"
    alpha: float = 1.702
    limit: float = 7.0
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    # Trainable leaves and how the LoRA factors are made from them:
    # loras(leaves) -> (lora_gate_up, lora_down), each (A [E, r, in], B [E, out, r], scale) or None.
    leaves: list = field(default_factory=list)
    loras: Callable | None = None


def near_kink(call: LayerCall) -> bool:
    """Whether a route's gate or up value lies within a few BF16 steps of a clamp of
    ``clamped_swiglu`` (``g = limit``, ``u = +-limit``): there the gradients jump, and the engine's
    rounded gate/up may fall on the other side. Its outputs stay continuous; its gradients are then
    not comparable."""
    if call.activation != "clamped_swiglu":
        return False
    E, two_i = call.gate_up.shape[:2]
    t, j = (call.ids < E).nonzero(as_tuple=True)
    e, x = call.ids[t, j], call.x[t].double()
    gu = torch.einsum("rh,roh->ro", x, call.gate_up[e].double())
    lgu = call.loras([l.detach().double() for l in call.leaves])[0] if call.loras else None
    if lgu is not None:
        A, B, s = lgu
        gu = gu + s * torch.einsum("rq,roq->ro", torch.einsum("rh,rqh->rq", x, A[e]), B[e])
    if call.gate_up_bias is not None:
        gu = gu + call.gate_up_bias.double()[e]
    g, u, margin = gu[:, : two_i // 2], gu[:, two_i // 2:], 4 * BF16_UNIT * call.limit
    return bool(((g - call.limit).abs() < margin).any() or ((u.abs() - call.limit).abs() < margin).any())


def _evaluate(call: LayerCall, dy, scale) -> dict[str, torch.Tensor]:
    """y, and with ``dy`` dx, dw and ``leaf{i}`` gradients, in float64, every input through ``scale``."""
    x = scale(call.x).requires_grad_()
    w = scale(call.w).requires_grad_()
    leaves = [scale(l).requires_grad_() for l in call.leaves]
    lgu, ld = call.loras(leaves) if call.loras else (None, None)
    opt = lambda t: None if t is None else scale(t)  # noqa: E731
    y = routed_experts_reference(x, call.ids, w, scale(call.gate_up), scale(call.down), lora_gate_up=lgu,
                                 lora_down=ld, activation=call.activation, alpha=call.alpha, limit=call.limit,
                                 gate_up_bias=opt(call.gate_up_bias), down_bias=opt(call.down_bias))
    out = {"y": y.detach()}
    if dy is not None:
        grads = torch.autograd.grad(y, [x, w, *leaves], scale(dy), allow_unused=True) if y.requires_grad else \
            [None] * (2 + len(leaves))
        named = zip(["dx", "dw"] + [f"leaf{i}" for i in range(len(leaves))], grads, [x, w, *leaves])
        out.update({name: torch.zeros_like(t) if g is None else g for name, g, t in named})
    return out


def reference_terms(call: LayerCall, dy: torch.Tensor | None, seed: int = 0) -> dict:
    """``{output: (reference, sensitivity)}`` for y, and with ``dy`` for dx, dw and ``leaf{i}``."""
    exact = _evaluate(call, dy, lambda t: t.detach().double())
    g = torch.Generator().manual_seed(seed)
    spread = {name: torch.zeros_like(v) for name, v in exact.items()}
    for _ in range(PERTURBATIONS):
        def scale(t):
            t = t.detach().double()
            signs = torch.randint(0, 2, t.shape, generator=g).double() * 2 - 1
            return t * (1 + BF16_UNIT * signs)

        for name, v in _evaluate(call, dy, scale).items():
            spread[name] = torch.maximum(spread[name], (v - exact[name]).abs())
    return {name: (exact[name], spread[name]) for name in exact}


def route_magnitudes(call: LayerCall, dy: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """For each output, the sum over routes of its terms' absolute values (see the module notes)."""
    E, f64 = call.gate_up.shape[0], torch.float64
    mags = {"y": torch.zeros(call.x.shape, dtype=f64), "dx": torch.zeros(call.x.shape, dtype=f64),
            "dw": torch.zeros(call.ids.shape, dtype=f64)}
    mags.update({f"leaf{i}": torch.zeros(l.shape, dtype=f64) for i, l in enumerate(call.leaves)})
    for t, j in (call.ids < E).nonzero().tolist():
        route = LayerCall(call.gate_up, call.down, call.x[t:t + 1], call.ids[t:t + 1, j:j + 1], torch.ones(1, 1),
                          call.activation, call.alpha, call.limit, call.gate_up_bias, call.down_bias, call.leaves,
                          call.loras)
        one = _evaluate(route, None if dy is None else dy[t:t + 1], lambda v: v.detach().double())
        weight = abs(float(call.w[t, j]))
        mags["y"][t] += weight * one["y"][0].abs()
        if dy is None:
            continue
        mags["dx"][t] += weight * one["dx"][0].abs()
        mags["dw"][t, j] = (dy[t].double().abs() * one["y"][0].abs()).sum()
        for i in range(len(call.leaves)):
            mags[f"leaf{i}"] += weight * one[f"leaf{i}"].abs()
    return mags


def check_outputs(got: dict[str, torch.Tensor | None], call: LayerCall, dy: torch.Tensor | None, *,
                  gradients: bool = True) -> None:
    """AssertionError naming the first output of ``got`` further from its reference than allowed
    (``gradients=False``: y only, see `near_kink`)."""
    terms, mags = reference_terms(call, dy), None
    for name, value in got.items():
        if value is None or name not in terms or not gradients and name != "y":
            continue
        reference, sensitivity = terms[name]
        assert tuple(value.shape) == tuple(reference.shape), f"{name}: shape {list(value.shape)} != {list(reference.shape)}"
        err = (value.double() - reference).norm().item()
        allowed = REL_TOL * reference.norm().item() + SENSITIVITY_FACTOR * sensitivity.norm().item()
        if err > allowed:   # cancellation? (computed only now: one reference call per route)
            mags = mags or route_magnitudes(call, dy)
            allowed = REL_TOL * mags[name].norm().item() + SENSITIVITY_FACTOR * sensitivity.norm().item()
        assert err <= allowed, f"{name}: error {err:.4g} exceeds the allowed {allowed:.4g} (silently wrong)"
