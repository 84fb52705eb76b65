"""Engine forward and backward on every ISA path against the float64 reference (moe_case.py)."""

from __future__ import annotations

import pytest
import torch

from kt_trl._native import ops
from kt_trl.engine import ExpertEngine

from .conftest import isa_params
from .moe_case import REL_TOL, engine_loras, make_case, rel_err, run_engine, run_reference

# (E, H, I, T, k, rank_gate_up, rank_down, options): odd sizes, ragged token counts, every rank.
SHAPES = [
    pytest.param(1, 32, 32, 1, 1, 0, 0, {}, id="E1-T1-k1"),
    pytest.param(4, 96, 80, 37, 2, 1, 1, {}, id="H96-I80-r1"),
    pytest.param(8, 64, 48, 300, 8, 8, 8, {}, id="T300-k8-r8"),
    pytest.param(16, 40, 24, 77, 4, 33, 0, {"sentinel": True}, id="E16-r33-sentinel"),
    pytest.param(6, 48, 40, 50, 3, 0, 5, {"one_expert": True}, id="all-on-one-expert"),
    pytest.param(12, 96, 80, 5, 2, 8, 8, {}, id="experts-without-tokens"),
    pytest.param(3, 160, 100, 33, 1, 0, 0, {"sentinel": True}, id="H160-I100-k1"),
    # K longer than one GEMM K-slice (512) and more columns than one work item (driver.h).
    pytest.param(2, 1056, 600, 40, 2, 4, 4, {}, id="H1056-I600-K-slices"),
    # ~60 rows per expert: some experts on each side of the backward's direct-from-panels limit (64 rows).
    pytest.param(6, 64, 48, 120, 3, 4, 4, {}, id="rows-around-the-direct-limit"),
    # gpt-oss experts: clamped SwiGLU and frozen biases.
    pytest.param(8, 96, 80, 60, 4, 0, 0, {"activation": "clamped_swiglu", "bias": True, "sentinel": True},
                 id="gpt-oss-act-bias"),
    pytest.param(4, 64, 48, 40, 2, 4, 4, {"activation": "clamped_swiglu", "bias": True}, id="gpt-oss-lora"),
]

OUTPUTS = ("y", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d")


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("E,H,I,T,k,rgu,rd,opts", SHAPES)
def test_matches_float64_reference(use_isa, isa, E, H, I, T, k, rgu, rd, opts):
    use_isa(isa)
    case = make_case(E, H, I, T, k, rgu, rd, **opts)
    got, ref = run_engine(case), run_reference(case)
    assert set(got) == set(ref)
    for name in OUTPUTS:
        if name in ref:
            assert got[name].shape == ref[name].shape, name
            assert rel_err(got[name], ref[name]) <= REL_TOL, f"{name}: {rel_err(got[name], ref[name]):.2e}"


@pytest.mark.parametrize("isa", isa_params())
def test_lora_gradients_of_experts_without_tokens_are_zero(use_isa, isa):
    use_isa(isa)
    case = make_case(8, 32, 32, 3, 1, 4, 4)
    unused = sorted(set(range(8)) - set(case.ids.flatten().tolist()))
    got = run_engine(case)
    assert unused
    for name in ("dA_gu", "dB_gu", "dA_d", "dB_d"):
        assert torch.count_nonzero(got[name][unused]) == 0, name


@pytest.mark.parametrize("isa", isa_params())
def test_sentinel_only_tokens_give_zero_output(use_isa, isa):
    use_isa(isa)
    case = make_case(4, 32, 32, 6, 2, 2, 2)
    case.ids[3:] = 4
    got = run_engine(case)
    assert torch.count_nonzero(got["y"][3:]) == 0
    assert torch.count_nonzero(got["dx"][3:]) == 0
    assert torch.count_nonzero(got["dw"][3:]) == 0


@pytest.mark.parametrize("isa", isa_params())
def test_results_do_not_depend_on_thread_count(use_isa, isa):
    case = make_case(8, 96, 80, 200, 4, 4, 4, sentinel=True)
    results = []
    for threads in (1, 2, 3):
        use_isa(isa, threads=threads)
        results.append(run_engine(case))
    for other in results[1:]:
        for name, value in results[0].items():
            assert torch.equal(value, other[name]), name


@pytest.mark.parametrize("isa", isa_params())
def test_int32_ids_and_bf16_weights(use_isa, isa):
    use_isa(isa)
    case = make_case(4, 32, 32, 9, 2)
    engine = ExpertEngine(case.gate_up, case.down)
    y64, _ = engine.forward(case.x, case.ids, case.w.bfloat16())
    y32, _ = engine.forward(case.x, case.ids.int(), case.w.bfloat16())
    assert torch.equal(y64, y32)
    case.w = case.w.bfloat16().float()
    assert rel_err(y64, run_reference(case)["y"]) <= REL_TOL


@pytest.mark.parametrize("isa", isa_params())
def test_forward_without_saving_gives_the_same_output(use_isa, isa):
    use_isa(isa)
    case = make_case(6, 48, 40, 30, 3, 2, 2, sentinel=True)
    engine = ExpertEngine(case.gate_up, case.down)
    lgu, ld = engine_loras(case)
    y_saved, saved = engine.forward(case.x, case.ids, case.w, lora_gate_up=lgu, lora_down=ld)
    y_plain, nothing = engine.forward(case.x, case.ids, case.w, lora_gate_up=lgu, lora_down=ld, save=False)
    assert torch.equal(y_saved, y_plain)
    assert saved.gate_up is not None and nothing.gate_up is None


def test_gpt_oss_cases_reach_the_clamps():
    case = make_case(8, 96, 80, 60, 4, activation="clamped_swiglu", bias=True)
    gu = case.x.double() @ case.gate_up[0].double().t() + case.gate_up_bias[0].double()
    assert (gu[:, :80] > 7).any() and (gu[:, 80:].abs() > 7).any()


@pytest.mark.parametrize("isa", isa_params())
def test_lora_gradients_overwrite_the_callers_buffers(use_isa, isa):
    use_isa(isa)
    case = make_case(8, 64, 48, 60, 4, 4, 4, sentinel=True)
    engine = ExpertEngine(case.gate_up, case.down)
    lgu, ld = engine_loras(case)
    expected = run_engine(case, engine)
    _, saved = engine.forward(case.x, case.ids, case.w, lora_gate_up=lgu, lora_down=ld)
    buffers = [(torch.full_like(l.A, float("nan")), torch.empty_strided(l.B.shape, l.B.stride()).fill_(float("nan")))
               for l in (lgu, ld)]
    ops.experts_backward(engine._handle, engine.dims, case.dy, case.x, case.ids, case.w, saved.as_tuple(), lgu, ld,
                         grads_gate_up=buffers[0], grads_down=buffers[1])
    for g, name in zip((*buffers[0], *buffers[1]), ("dA_gu", "dB_gu", "dA_d", "dB_d")):
        assert torch.equal(g, expected[name]), name
