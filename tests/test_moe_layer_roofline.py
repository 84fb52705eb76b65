"""`benchmarks/moe_layer.py`'s per-stage roofline: which ceiling bounds a stage, on AMX and AVX-512 hosts."""

from __future__ import annotations

import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def moe_layer():
    return benchmark_module("moe_layer")


STAGES = {"fwd_gate_up": 1000.0, "fwd_combine": 2.0}


@pytest.mark.parametrize("ceil, compute", [
    ({"dram_read_gbs": 100.0, "amx_peak_tflops": 30.0, "avx512_bf16_peak_tflops": 2.0}, "amx"),
    ({"dram_read_gbs": 100.0, "avx512_bf16_peak_tflops": 0.5}, "avx512"),
])
def test_the_compute_ceiling_is_the_hosts_fastest_path(moe_layer, ceil, compute):
    rec = moe_layer.stage_roofline("qwen3", 8192, (128, 2048, 768, 8), 16, STAGES, ceil)
    assert rec["compute_ceiling"] == compute
    gate_up, combine = rec["fwd_gate_up"], rec["fwd_combine"]
    flops = 2 * 8192 * 8 * 2048 * 2 * 768   # T k H 2I, two flops per product
    assert gate_up["flops"] >= flops
    peak = ceil[f"{compute}{moe_layer.COMPUTE_KEY[compute]}"]
    assert gate_up[f"frac_{compute}"] == pytest.approx(gate_up["flops"] / 1000.0 / 1e9 / peak, abs=1e-4)   # rounded to 4 places
    assert combine["flops"] == 0 and combine["bound"] == "dram"   # no arithmetic: only DRAM bounds it
    if compute == "avx512":   # 0.41 TFLOPS of a 0.5 TFLOPS peak: AVX-512, not DRAM, bounds the GEMM
        assert gate_up["bound"] == "avx512" and "AVX512-bound" in moe_layer.worst_stage_line(rec)


def test_without_a_compute_ceiling_the_line_says_so(moe_layer):
    rec = moe_layer.stage_roofline("qwen3", 512, (128, 2048, 768, 8), 16, STAGES, {"dram_read_gbs": 100.0})
    assert rec["compute_ceiling"] is None and "no compute ceiling" in moe_layer.worst_stage_line(rec)
