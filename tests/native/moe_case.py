"""Random MoE layer cases and the float64 reference results the engine is compared against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kt_trl.engine import ExpertEngine, ExpertLoRA
from kt_trl.reference import routed_experts_reference

# BF16 keeps 8 significant bits: one rounding has relative error <= 2^-8. The engine rounds to BF16
# at the saved gate/up activations, at h (the down GEMM's operand), at dGU (the dX GEMM's operand)
# and once at each output; the inputs are the same BF16 values in both. Errors of independent
# roundings add in quadrature, so a norm-wise relative error of 3 * 2^-8 bounds every output.
BF16_UNIT = 2.0 ** -8
REL_TOL = 3 * BF16_UNIT


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@dataclass
class Case:
    gate_up: torch.Tensor   # [E, 2I, H] bf16
    down: torch.Tensor      # [E, H, I] bf16
    x: torch.Tensor         # [T, H] bf16
    ids: torch.Tensor       # [T, k] int64
    w: torch.Tensor         # [T, k] float32
    dy: torch.Tensor        # [T, H] bf16
    lora_gate_up: tuple | None   # (A [E, r, H], B_peft [2I, r*E], scale)
    lora_down: tuple | None      # (A [E, r, I], B [E, H, r], scale)
    activation: str = "silu"
    gate_up_bias: torch.Tensor | None = None   # [E, 2I]
    down_bias: torch.Tensor | None = None      # [E, H]

    @property
    def dims(self):
        E, two_i, H = self.gate_up.shape
        return E, H, two_i // 2


def make_case(E, H, I, T, k, rank_gate_up=0, rank_down=0, *, seed=0, sentinel=False, one_expert=False,
              activation="silu", bias=False) -> Case:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    # gpt-oss cases: gate/up values of a few units, so that the clamps at +-7 are reached.
    gain = 3.0 if activation == "clamped_swiglu" else 1.0
    gate_up = (rnd(E, 2 * I, H) * gain / H ** 0.5).bfloat16()
    down = (rnd(E, H, I) / I ** 0.5).bfloat16()
    x = rnd(T, H).bfloat16()
    choices = E + 1 if sentinel else E
    ids = torch.stack([torch.randperm(choices, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    if one_expert:
        ids[:, 0] = 0
        ids[:, 1:] = E   # all other slots skipped
    w = torch.rand(T, k, generator=g)
    dy = rnd(T, H).bfloat16()
    lgu = (rnd(E, rank_gate_up, H) * 0.2, rnd(2 * I, rank_gate_up * E) * 0.2, 0.5) if rank_gate_up else None
    ld = (rnd(E, rank_down, I) * 0.2, rnd(E, H, rank_down) * 0.2, 2.0) if rank_down else None
    biases = (rnd(E, 2 * I), rnd(E, H) * 0.1) if bias else (None, None)
    return Case(gate_up, down, x, ids, w, dy, lgu, ld, activation, *biases)


def make_engine(case: Case) -> ExpertEngine:
    return ExpertEngine(case.gate_up, case.down, activation=case.activation, gate_up_bias=case.gate_up_bias,
                        down_bias=case.down_bias)


def peft_b_view(B_peft: torch.Tensor, E: int) -> torch.Tensor:
    """PEFT's ``lora_B.weight [out, r*E]`` as ``[E, out, r]`` (column ``q*E + e``)."""
    out, rE = B_peft.shape
    return B_peft.view(out, rE // E, E).permute(2, 0, 1)


def engine_loras(case: Case):
    E = case.dims[0]
    lgu = ExpertLoRA(case.lora_gate_up[0], peft_b_view(case.lora_gate_up[1], E), case.lora_gate_up[2]) if case.lora_gate_up else None
    ld = ExpertLoRA(*case.lora_down) if case.lora_down else None
    return lgu, ld


def run_engine(case: Case, engine: ExpertEngine | None = None):
    """Engine results: dict of y, dx, dw and LoRA gradients (dB in the caller's layout)."""
    engine = engine or make_engine(case)
    lgu, ld = engine_loras(case)
    y, saved = engine.forward(case.x, case.ids, case.w, lora_gate_up=lgu, lora_down=ld)
    dx, dw, g_gu, g_d = engine.backward(case.dy, case.x, case.ids, case.w, saved, lora_gate_up=lgu, lora_down=ld)
    out = {"y": y, "dx": dx, "dw": dw}
    if g_gu:
        out["dA_gu"], out["dB_gu"] = g_gu
    if g_d:
        out["dA_d"], out["dB_d"] = g_d
    return out


def run_reference(case: Case):
    """Float64 reference values of the same outputs, by torch.autograd through reference.py."""
    E = case.dims[0]
    x = case.x.detach().double().requires_grad_()
    w = case.w.detach().double().requires_grad_()
    leaves = {}
    lgu = ld = None
    if case.lora_gate_up:
        A, B, s = case.lora_gate_up
        leaves["dA_gu"], leaves["dB_gu"] = A.double().requires_grad_(), B.double().requires_grad_()
        lgu = (leaves["dA_gu"], peft_b_view(leaves["dB_gu"], E), s)
    if case.lora_down:
        A, B, s = case.lora_down
        leaves["dA_d"], leaves["dB_d"] = A.double().requires_grad_(), B.double().requires_grad_()
        ld = (leaves["dA_d"], leaves["dB_d"], s)
    y = routed_experts_reference(x, case.ids, w, case.gate_up, case.down, lora_gate_up=lgu, lora_down=ld,
                                 activation=case.activation, gate_up_bias=case.gate_up_bias,
                                 down_bias=case.down_bias)
    if y.requires_grad:
        y.backward(case.dy.double())
    out = {"y": y.detach(), "dx": _grad(x), "dw": _grad(w)}
    for name, leaf in leaves.items():
        g = _grad(leaf)
        out[name] = peft_b_view(g, E) if name == "dB_gu" else g
    return out


def _grad(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)
