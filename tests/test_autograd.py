"""The autograd Function over the engine (through `routed_experts`), and the reference under gradcheck."""

from __future__ import annotations

import pytest
import torch

from kt_trl.experts import routed_experts
from kt_trl.engine import ExpertEngine, ExpertLoRA
from kt_trl.reference import routed_experts_reference

from tests.native.moe_case import REL_TOL, make_case, peft_b_view, rel_err, run_reference


def test_reference_passes_gradcheck_in_float64():
    case = make_case(3, 6, 5, 4, 2, 2, 2, sentinel=True)
    E = 3
    x = case.x.double().requires_grad_()
    w = case.w.double().requires_grad_()
    A1, B1 = (t.double().requires_grad_() for t in case.lora_gate_up[:2])
    A2, B2 = (t.double().requires_grad_() for t in case.lora_down[:2])

    def f(x, w, A1, B1, A2, B2):
        return routed_experts_reference(x, case.ids, w, case.gate_up.double(), case.down.double(),
                                        lora_gate_up=(A1, peft_b_view(B1, E), 0.5), lora_down=(A2, B2, 2.0))

    assert torch.autograd.gradcheck(f, (x, w, A1, B1, A2, B2))


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_peft_style_parameters(weights_dtype):
    case = make_case(4, 48, 40, 25, 2, 4, 4)
    E = 4
    engine = ExpertEngine(case.gate_up, case.down)
    # Parameters laid out as PEFT keeps them: lora_A [E*r, in], lora_B [out, r*E].
    A_gu = case.lora_gate_up[0].reshape(E * 4, 48).clone().requires_grad_()
    B_gu = case.lora_gate_up[1].clone().requires_grad_()
    A_d = case.lora_down[0].reshape(E * 4, 40).clone().requires_grad_()
    B_d_peft = case.lora_down[1].permute(1, 2, 0).reshape(48, 4 * E).clone().requires_grad_()
    x = case.x.clone().requires_grad_()
    w = case.w.to(weights_dtype).clone().requires_grad_()
    y = routed_experts(engine, x, case.ids, w,
                       lora_gate_up=ExpertLoRA(A_gu.view(E, 4, 48), peft_b_view(B_gu, E), 0.5),
                       lora_down=ExpertLoRA(A_d.view(E, 4, 40), peft_b_view(B_d_peft, E), 2.0))
    assert y.dtype == torch.bfloat16 and y.shape == (25, 48)
    y.backward(case.dy)
    case.w = case.w.to(weights_dtype).float()
    ref = run_reference(case)
    assert w.grad.dtype == weights_dtype
    assert rel_err(x.grad, ref["dx"]) <= REL_TOL
    assert rel_err(w.grad, ref["dw"]) <= REL_TOL
    assert rel_err(A_gu.grad.view(E, 4, 48), ref["dA_gu"]) <= REL_TOL
    assert rel_err(peft_b_view(B_gu.grad, E), ref["dB_gu"]) <= REL_TOL
    assert rel_err(A_d.grad.view(E, 4, 40), ref["dA_d"]) <= REL_TOL
    assert rel_err(peft_b_view(B_d_peft.grad, E), ref["dB_d"]) <= REL_TOL


def test_float32_hidden_states_keep_their_dtype():
    case = make_case(2, 32, 32, 5, 1)
    engine = ExpertEngine(case.gate_up, case.down)
    x = case.x.float().requires_grad_()
    y = routed_experts(engine, x, case.ids, case.w)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
