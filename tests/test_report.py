"""RoutingReport text and parameter grouping."""

from __future__ import annotations

from kt_trl.layouts import REGISTRY
from kt_trl.report import RoutingReport, _group

QWEN2 = next(layout for layout in REGISTRY if layout.family == "Qwen2-MoE")
GRANITE = next(layout for layout in REGISTRY if layout.family == "Granite-MoE")


def report(**overrides):
    fields = dict(
        family="Qwen3-MoE", layers_routed=(0, 1), experts_per_layer=(8, 8), isa="avx2", threads=2,
        packed_bytes=3 * 2**20, expert_lora=(("a.experts.lora_A.default.weight", 1000),),
        adapters=(("attention", 200), ("experts", 1000)), untrained_groups=("shared experts",),
        trainable_parameters=1200, total_parameters=120000, reuse_checkpointed_activations=True,
    )
    fields.update(overrides)
    return RoutingReport(**fields)


def test_adapters_line():
    line = report().adapters_line()
    assert line == (
        "kt_trl: trainable attention 200, experts 1,000; no adapters on shared experts; 1,200 of 120,000 "
        "parameters (1.00%), expert LoRA 1,000 on the CPU"
    )


def test_summary():
    text = report(reuse_checkpointed_activations=False).summary()
    assert "Qwen3-MoE: routed experts of 2 layer(s) (8 experts each)" in text
    assert "[avx2, 2 thread(s)], 3.0 MiB packed (BF16)" in text
    assert "recomputes the CPU expert forward" in text


def test_groups():
    prefix = "base_model.model.model.layers.3."
    assert _group(prefix + "mlp.experts.base_layer.lora_A.default.weight", QWEN2) == "experts"
    assert _group(prefix + "mlp.gate.lora_B.default.weight", QWEN2) == "router"
    assert _group(prefix + "mlp.shared_expert.up_proj.lora_A.default.weight", QWEN2) == "shared experts"
    assert _group(prefix + "mlp.shared_expert_gate.lora_A.default.weight", QWEN2) == "shared experts"
    assert _group(prefix + "mlp.down_proj.lora_A.default.weight", QWEN2) == "dense mlp"
    assert _group(prefix + "self_attn.q_proj.lora_A.default.weight", QWEN2) == "attention"
    assert _group("base_model.model.lm_head.weight", QWEN2) == "other"
    assert _group(prefix + "block_sparse_moe.router.layer.weight", GRANITE) == "router"
