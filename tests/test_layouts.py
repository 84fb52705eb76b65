"""The architecture registry: every supported family found, the rest refused with the list."""

from __future__ import annotations

import pytest

from kt_trl.containers import find_decoder_layers, find_moe_blocks
from kt_trl.layouts import REGISTRY, check_experts_module, match_experts_class, match_layout, supported_families
from tests.helpers import FAMILIES, tiny_model

FAMILY_NAMES = {
    "qwen3_moe": "Qwen3-MoE", "qwen2_moe": "Qwen2-MoE", "mixtral": "Mixtral", "olmoe": "OLMoE",
    "deepseek_v3": "DeepSeek-V3", "deepseek_v2": "DeepSeek-V2", "glm4_moe": "GLM4-MoE",
    "ernie4_5_moe": "ERNIE-4.5-MoE", "minimax_m2": "MiniMax-M2", "hunyuan_v1_moe": "HunYuan-V1-MoE",
    "granitemoe": "Granite-MoE",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_is_matched_and_has_standard_experts(family):
    model = tiny_model(family, bf16_experts=False)
    layout = match_layout(model)
    assert layout.family == FAMILY_NAMES[family]
    blocks = find_moe_blocks(find_decoder_layers(model), layout)
    assert blocks
    for block in blocks:
        check_experts_module(layout, block.experts, where=block.name)
        assert hasattr(block.block, layout.router_attr), f"{layout.family}: no router {layout.router_attr}"
        for shared in layout.shared_attrs:
            assert hasattr(block.block, shared), f"{layout.family}: no {shared}"


def test_registry_is_data():
    model_types = [t for layout in REGISTRY for t in layout.model_types]
    assert len(model_types) == len(set(model_types))
    assert supported_families() == [FAMILY_NAMES[f] for f in FAMILY_NAMES] + ["gpt-oss"]  # registry order


def test_renamed_model_type_falls_back_to_the_experts_class():
    model = tiny_model("mixtral", bf16_experts=False)
    model.config.model_type = "my_mixtral_finetune"
    assert match_experts_class(model).family == "Mixtral"
    assert match_layout(model).family == "Mixtral"


def test_kimi_k2_is_deepseek_v3():
    assert match_layout(tiny_model("deepseek_v3", bf16_experts=False)).model_types == ("deepseek_v3", "kimi_k2")


def test_structure_mismatch_is_refused():
    model = tiny_model("qwen3_moe", bf16_experts=False)
    layout = match_layout(model)
    experts = model.model.layers[0].mlp.experts
    experts.has_bias = True
    with pytest.raises(ValueError, match="layers.0.*Qwen3-MoE.*has_bias=True.*plain trl.SFTTrainer"):
        check_experts_module(layout, experts, where="layers.0")




def test_transformers_fp8_experts_get_the_way_to_load_them():
    # What from_pretrained gives for an FP8 checkpoint where a GPU is visible (its FP8Experts class).
    model = tiny_model("deepseek_v3", bf16_experts=False)
    experts = model.model.layers[1].mlp.experts
    experts.__class__ = type("FP8Experts", (type(experts),), {})
    with pytest.raises(ValueError, match=r"FP8-quantized experts \(FP8Experts\).*name or directory to KTSFTTrainer"):
        check_experts_module(match_layout(model), experts, where="layers.1")
