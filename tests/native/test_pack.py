"""Packing: exact round trip, strided sources, and the engine's memory for a layer."""

from __future__ import annotations

import pytest
import torch

from kt_trl.engine import ExpertEngine


@pytest.mark.parametrize("E,H,I", [(1, 32, 32), (3, 96, 80), (2, 17, 5), (4, 2048 // 16, 768 // 16)])
def test_pack_unpack_round_trip(E, H, I):
    gate_up = torch.randn(E, 2 * I, H).bfloat16()
    down = torch.randn(E, H, I).bfloat16()
    got_gu, got_d = ExpertEngine(gate_up, down).unpack()
    assert torch.equal(got_gu, gate_up) and torch.equal(got_d, down)


def test_load_from_strided_rows():
    # A [E, 2I, H] slice of a wider buffer: rows are not contiguous with each other.
    wide = torch.randn(2, 64, 96).bfloat16()
    gate_up, down = wide[:, :, :40], torch.randn(2, 40, 32).bfloat16()
    assert not gate_up.is_contiguous()
    got_gu, _ = ExpertEngine(gate_up, down).unpack()
    assert torch.equal(got_gu, gate_up)


def test_float32_weights_are_rounded_to_bf16():
    gate_up, down = torch.randn(2, 64, 32), torch.randn(2, 32, 32)
    got_gu, got_d = ExpertEngine(gate_up, down).unpack()
    assert torch.equal(got_gu, gate_up.bfloat16()) and torch.equal(got_d, down.bfloat16())


@pytest.mark.parametrize("E,H,I", [(8, 2048 // 8, 768 // 8), (4, 96, 80)])
def test_packed_bytes_close_to_bf16_weights(E, H, I):
    engine = ExpertEngine(torch.zeros(E, 2 * I, H), torch.zeros(E, H, I))
    bf16_bytes = 2 * E * 3 * H * I
    if H % 32 == 0 and I % 32 == 0:
        assert engine.packed_bytes == bf16_bytes   # model shapes: no padding at all
    else:
        assert bf16_bytes <= engine.packed_bytes <= 1.5 * bf16_bytes   # K padded to 32 only


def test_engine_built_expert_by_expert_matches_whole_layer():
    gate_up, down = torch.randn(3, 64, 32).bfloat16(), torch.randn(3, 32, 32).bfloat16()
    streamed = ExpertEngine.from_experts(3, 32, 32, ((gate_up[e], down[e]) for e in range(3)))
    got_gu, got_d = streamed.unpack()
    assert torch.equal(got_gu, gate_up) and torch.equal(got_d, down)
    with pytest.raises(ValueError, match="expected num_experts=3"):
        ExpertEngine.from_experts(3, 32, 32, ((gate_up[e], down[e]) for e in range(2)))
