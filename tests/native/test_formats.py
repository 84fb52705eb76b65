"""FP8 and INT8 frozen experts: the engine against the float64 reference of their dequantized
weights on every ISA path, bit for bit against a BF16 engine on those weights, INT8 against the
BF16 weights it was quantized from, checkpoint codes kept as they are, and the boundary's refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kt_trl._native import KTNativeError
from kt_trl.checkpoint_keys import dequantize_fp8
from kt_trl.engine import ExpertEngine
from kt_trl.formats import QuantizedWeight, quantize_fp8, quantize_int8, rows_of_block_scales

from .conftest import isa_params
from .moe_case import REL_TOL, make_case, rel_err, run_engine, run_reference

# (E, H, I, T, k, rank_gate_up, rank_down, options, fp8 block_k): ragged sizes, partial scale
# blocks (H = 40 in blocks of 16), K-sliced GEMMs, biases.
SHAPES = [
    pytest.param(4, 96, 80, 37, 2, 1, 1, {}, 16, id="H96-I80-r1"),
    pytest.param(16, 40, 24, 77, 4, 8, 0, {"sentinel": True}, 16, id="E16-partial-blocks"),
    pytest.param(2, 1056, 600, 40, 2, 4, 4, {}, 128, id="H1056-I600-K-slices"),
    pytest.param(8, 96, 80, 60, 4, 0, 3, {"bias": True}, 32, id="bias"),
]
FORMATS = ("fp8", "int8")


def quantized_engine(case, format: str, block_k: int) -> ExpertEngine:
    block_k = block_k if format == "fp8" else 0
    return ExpertEngine(case.gate_up, case.down, activation=case.activation, gate_up_bias=case.gate_up_bias,
                        down_bias=case.down_bias, format=format, block_k=block_k)


def dequantized_case(case, engine: ExpertEngine):
    gate_up, down = engine.unpack()
    return dataclasses.replace(case, gate_up=gate_up, down=down)


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("E,H,I,T,k,rgu,rd,opts,block_k", SHAPES)
def test_matches_float64_reference_of_the_dequantized_weights(use_isa, isa, format, E, H, I, T, k, rgu, rd, opts,
                                                              block_k):
    # The engine computes with bf16(code * scale): the BF16 contract (moe_case.REL_TOL) holds
    # against those weights; test_unpack_is_the_dequantized_weights pins what they are.
    use_isa(isa)
    case = make_case(E, H, I, T, k, rgu, rd, **opts)
    engine = quantized_engine(case, format, block_k)
    got, ref = run_engine(case, engine), run_reference(dequantized_case(case, engine))
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert rel_err(got[name], value) <= REL_TOL, f"{name}: {rel_err(got[name], value):.2e}"


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("opts", [{"sentinel": True}, {"activation": "clamped_swiglu", "bias": True}],
                         ids=["silu", "gpt-oss"])
def test_bit_identical_to_a_bf16_engine_on_the_dequantized_weights(use_isa, isa, format, opts):
    # (gpt-oss's clamps make its float64 comparison depend on where values fall near them; bit
    # equality with the BF16 engine, which the BF16 tests hold to the reference, does not.)
    use_isa(isa)
    case = make_case(8, 96, 80, 60, 4, 4, 4, **opts)
    engine = quantized_engine(case, format, 32)
    bf16 = dequantized_case(case, engine)
    got, want = run_engine(case, engine), run_engine(bf16)
    for name in want:
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("format,quantizer", [("fp8", lambda w: quantize_fp8(w, 32)), ("int8", quantize_int8)])
def test_unpack_is_the_dequantized_weights(format, quantizer):
    case = make_case(3, 96, 48, 1, 1)
    engine = quantized_engine(case, format, 32)
    gate_up, down = engine.unpack()
    for e in range(3):
        assert torch.equal(gate_up[e], quantizer(case.gate_up[e]).dequantize())
        assert torch.equal(down[e], quantizer(case.down[e]).dequantize())
    assert not torch.equal(gate_up, case.gate_up)   # it did quantize


def test_int8_stays_within_its_contract_of_the_bf16_weights():
    # Per-row INT8 of Gaussian weights: step = max|w| / 127 ~ 4 sigma / 127, error sigma / 110 per
    # weight; the 0.015 contract on y and dx leaves room for the row maxima of wider rows.
    case = make_case(8, 512, 256, 128, 2)
    got = run_engine(case, quantized_engine(case, "int8", 0))
    want = run_reference(case)
    for name in ("y", "dx"):
        assert rel_err(got[name], want[name]) <= 0.015, f"{name}: {rel_err(got[name], want[name]):.4f}"


def test_fp8_checkpoint_codes_and_block_scales_are_kept_as_they_are():
    # DeepSeek's layout: float8_e4m3fn weights with one weight_scale_inv per 128 x 128 block.
    g = torch.Generator().manual_seed(3)
    E, H, I, block = 2, 256, 192, 128   # I = 1.5 blocks: the gate / up boundary falls inside a block row
    experts, dequantized = [], []
    for _ in range(E):
        gate, up, down = (torch.randn(I, H, generator=g), torch.randn(I, H, generator=g), torch.randn(H, I, generator=g))
        parts = []
        for w in (gate, up, down):
            scale_inv = torch.rand(-(-w.shape[0] // block), -(-w.shape[1] // block), generator=g) * 0.01 + 1e-3
            codes = (w / 0.3).clamp(-448, 448).to(torch.float8_e4m3fn)
            parts.append((codes, scale_inv))
        (gc, gs), (uc, us), (dc, ds) = parts
        gate_up = QuantizedWeight(torch.cat([gc, uc]), torch.cat([rows_of_block_scales(gs, I, block),
                                                                  rows_of_block_scales(us, I, block)]), block)
        experts.append((gate_up, QuantizedWeight(dc, rows_of_block_scales(ds, H, block), block)))
        dequantized.append((torch.cat([dequantize_fp8(gc, gs, (block, block)), dequantize_fp8(uc, us, (block, block))]),
                            dequantize_fp8(dc, ds, (block, block))))
    engine = ExpertEngine.from_experts(E, H, I, experts, format="fp8", block_k=block)
    gate_up, down = engine.unpack()
    for e, (want_gu, want_d) in enumerate(dequantized):   # the loader's dequantization, rounded to BF16 once
        assert torch.equal(gate_up[e], want_gu.bfloat16())
        assert torch.equal(down[e], want_d.bfloat16())


@pytest.mark.parametrize("format,block_k", [("fp8", 128), ("int8", 0)])
def test_8bit_experts_hold_at_most_0_52_of_the_bf16_bytes(format, block_k):
    shape = dict(num_experts=1, hidden_size=2048, intermediate_size=768)
    zeros = [(torch.zeros(2 * 768, 2048), torch.zeros(2048, 768))]
    bf16 = ExpertEngine.from_experts(*shape.values(), zeros)
    packed = ExpertEngine.from_experts(*shape.values(), zeros, format=format, block_k=block_k)
    assert packed.packed_bytes <= 0.52 * bf16.packed_bytes


def fp8_weight(N, K, code=0x38):
    codes = torch.full((N, K), code, dtype=torch.uint8).view(torch.float8_e4m3fn)
    return QuantizedWeight(codes, torch.ones(N, -(-K // 16)), 16)


def test_nan_codes_and_unusable_scales_are_refused_with_the_expert_named():
    engine = ExpertEngine.from_experts(2, 32, 16, [(fp8_weight(32, 32), fp8_weight(32, 16))] * 2, format="fp8",
                                       block_k=16)
    nan = fp8_weight(32, 16)
    nan.codes.view(torch.uint8)[3, 5] = 0xFF
    with pytest.raises(KTNativeError, match=r"expert 1 down: FP8 code 0xFF at \[3, 5\] is NaN"):
        engine.load_expert(1, fp8_weight(32, 32), nan)
    for bad in (float("inf"), float("nan"), 1e-35, 1e35):
        w = fp8_weight(32, 32)
        w.scales[0, 1] = bad
        with pytest.raises(KTNativeError, match=r"expert 0 gate_up: scale .* at \[0, 1\]"):
            engine.load_expert(0, w, fp8_weight(32, 16))


def test_mismatched_formats_are_refused():
    fp8 = ExpertEngine.from_experts(1, 32, 16, [(fp8_weight(32, 32), fp8_weight(32, 16))], format="fp8", block_k=16)
    with pytest.raises(ValueError, match="scales per 32 values; this engine keeps one per 16"):
        fp8.load_expert(0, dataclasses.replace(fp8_weight(32, 32), block_k=32), fp8_weight(32, 16))
    with pytest.raises(TypeError, match="this fp8 engine takes torch.float8_e4m3fn"):
        fp8.load_expert(0, quantize_int8(torch.randn(32, 32)), fp8_weight(32, 16))
    bf16 = ExpertEngine(torch.randn(1, 32, 32), torch.randn(1, 32, 16))
    with pytest.raises(TypeError, match="this engine stores BF16 weights"):
        bf16.load_expert(0, fp8_weight(32, 32), fp8_weight(32, 16))
    with pytest.raises(ValueError, match="format must be one of"):
        ExpertEngine(torch.randn(1, 32, 32), torch.randn(1, 32, 16), format="fp4")
    with pytest.raises(KTNativeError, match="block_k must be 0 .* or a positive multiple of 16"):
        ExpertEngine(torch.randn(1, 32, 32), torch.randn(1, 32, 16), format="fp8", block_k=24)


@pytest.mark.parametrize("format", ["bf16", "fp8", "int8"])
def test_an_engine_over_memory_another_engine_filled_computes_the_same(format):
    case = make_case(4, 64, 48, 20, 2, 2, 2)
    memory = torch.empty(ExpertEngine.weight_bytes(4, 64, 48, format), dtype=torch.uint8)
    filler = ExpertEngine.from_experts(4, 64, 48, zip(case.gate_up, case.down), format=format, memory=memory)
    reader = ExpertEngine.from_experts(4, 64, 48, None, format=format, memory=memory, filled=True)
    assert reader.shared and filler.packed_bytes == memory.numel()
    got, want = run_engine(case, reader), run_engine(case, filler)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_external_memory_that_cannot_hold_the_experts_is_refused():
    need = ExpertEngine.weight_bytes(2, 32, 16)
    with pytest.raises(KTNativeError, match=f"memory holds {need - 64} bytes; these experts need {need}"):
        ExpertEngine.from_experts(2, 32, 16, None, memory=torch.empty(need - 64, dtype=torch.uint8), filled=True)
    with pytest.raises(KTNativeError, match="not 64-byte aligned"):
        ExpertEngine.from_experts(2, 32, 16, None, memory=torch.empty(need + 64, dtype=torch.uint8)[1:], filled=True)
    with pytest.raises(TypeError, match="contiguous uint8 CPU tensor"):
        ExpertEngine.from_experts(2, 32, 16, None, memory=torch.empty(need), filled=True)
