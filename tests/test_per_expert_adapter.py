"""save_per_expert_adapter against transformers' own checkpoints of the base and the PEFT-merged model.

The reference needs none of kt_trl's mapping: `save_pretrained` writes the experts in the family's
checkpoint layout (per expert, its own names), once for the base model and once after PEFT's
`merge_and_unload`. Every exported module must name a tensor of those checkpoints, and its
scaled `B @ A` must be their difference.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from kt_trl.per_expert_adapter import save_per_expert_adapter

from tests.helpers import FAMILIES, expert_targets, tiny_model

PREFIX = "base_model.model."


def checkpoint(model, path) -> dict[str, torch.Tensor]:
    model.save_pretrained(path, safe_serialization=True)
    return load_file(str(path / "model.safetensors"))


def module_scaling(config: dict, module: str) -> float:
    """The scaling PEFT gives `module` under `config` (its rank / alpha patterns matched as PEFT does)."""
    def pattern_value(patterns: dict, default):
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern_value(config["rank_pattern"], config["r"])
    return pattern_value(config["alpha_pattern"], config["lora_alpha"]) / r


def peft_pair(family: str, **lora):
    base = tiny_model(family)
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **lora))
    return base, peft_model


# Granite's checkpoints keep the experts fused (refused below); PEFT's all-linear misses Qwen2-MoE's experts.
CASES = [(family, targets) for family in sorted(set(FAMILIES) - {"granitemoe"})
         for targets in ("explicit", "all-linear", "own rank") if (family, targets) != ("qwen2_moe", "all-linear")]


@pytest.mark.parametrize("family, targets", CASES)
def test_per_expert_lora_is_the_merged_checkpoint_difference(family, targets, tmp_path):
    lora = dict(r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"], target_parameters=expert_targets(family))
    if targets == "all-linear":  # PEFT adapts the router too
        lora = dict(r=4, lora_alpha=8, target_modules="all-linear")
    elif targets == "own rank":  # experts only, then the adapter's default r and alpha changed under them
        lora = dict(r=4, lora_alpha=16, target_parameters=expert_targets(family))
    base, peft_model = peft_pair(family, **lora)
    if targets == "own rank":
        peft_model.peft_config["default"].r, peft_model.peft_config["default"].lora_alpha = 2, 6
    out = save_per_expert_adapter(peft_model, tmp_path / "per_expert")
    adapter = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    peft_model.save_pretrained(tmp_path / "fused")
    fused = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))

    before = checkpoint(base, tmp_path / "base")
    after = checkpoint(peft_model.merge_and_unload(), tmp_path / "merged")
    modules = {k.removesuffix(".lora_A.weight").removeprefix(PREFIX) for k in adapter if k.endswith(".lora_A.weight")}
    expert_modules = {m for m in modules if re.search(r"\.experts\.\d+\.", m)}
    E = 8   # every tiny family
    moe_layers = sum(1 for k in before if re.search(r"experts\.0\.", k) and k.endswith(".weight")) // 3
    assert len(expert_modules) == moe_layers * E * 3 > 0   # gate, up, down of every expert of every MoE layer
    for m in modules:
        A, B = adapter[f"{PREFIX}{m}.lora_A.weight"], adapter[f"{PREFIX}{m}.lora_B.weight"]
        delta = module_scaling(config, m) * B.double() @ A.double()
        torch.testing.assert_close(delta, (after[m + ".weight"].double() - before[m + ".weight"].double()),
                                   rtol=1e-4, atol=1e-5, msg=m)
    assert len(adapter) == len(fused) + 2 * len(expert_modules) - 4 * moe_layers   # no other key lost or added
    assert config["target_parameters"] is None or not any(
        p.endswith(("gate_up_proj", "down_proj")) for p in config["target_parameters"])
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(config["target_modules"])


def test_the_per_expert_adapter_loads_into_peft_with_per_expert_names(tmp_path):
    """Its keys and config are a PEFT adapter: PEFT's own loader reads back every expert tensor."""
    from peft.utils import load_peft_weights

    _, peft_model = peft_pair("qwen3_moe", r=4, lora_alpha=8, target_modules="all-linear")
    out = save_per_expert_adapter(peft_model, tmp_path)
    weights = load_peft_weights(str(out))
    assert "base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_B.weight" in weights
    assert weights["base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_A.weight"].shape == (8, 32)


def test_refuses_an_adapter_without_fused_expert_lora(tmp_path):
    _, peft_model = peft_pair("qwen3_moe", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="no LoRA on fused 3-D expert parameters"):
        save_per_expert_adapter(peft_model, tmp_path)


def test_refuses_what_is_not_a_peft_model(tmp_path):
    with pytest.raises(ValueError, match="Expected a PEFT model"):
        save_per_expert_adapter(tiny_model("qwen3_moe"), tmp_path)


def test_refuses_a_family_whose_checkpoints_keep_experts_fused(tmp_path):
    """Granite's checkpoints hold one fused input_linear per layer: no per-expert names to use."""
    _, peft_model = peft_pair("granitemoe", r=4, lora_alpha=8, target_parameters=expert_targets("granitemoe"))
    with pytest.raises(ValueError, match="cannot be split per expert"):
        save_per_expert_adapter(peft_model, tmp_path)


def test_a_model_prepared_for_the_engine_exports_the_same(tmp_path):
    """After prepare_model the HF expert weights are placeholders and the LoRA feeds the engine:
    the export reads only names, shapes and the LoRA parameters, so it is unchanged."""
    from kt_trl.prepare import prepare_model

    _, peft_model = peft_pair("qwen3_moe", r=4, lora_alpha=8, target_modules="all-linear")
    before = load_file(str(save_per_expert_adapter(peft_model, tmp_path / "before") / "adapter_model.safetensors"))
    prepare_model(peft_model)
    after = load_file(str(save_per_expert_adapter(peft_model, tmp_path / "after") / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_a_saved_adapter_directory_exports_the_same_as_the_model(family, tmp_path):
    """From disk: the base architecture is built on the meta device from its config, no base weight read."""
    base, peft_model = peft_pair(family, r=4, lora_alpha=8, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path / "adapter")
    base.config.save_pretrained(tmp_path / "base")
    from_model = load_file(str(save_per_expert_adapter(peft_model, tmp_path / "a") / "adapter_model.safetensors"))
    out = save_per_expert_adapter(tmp_path / "adapter", tmp_path / "b", base_model=tmp_path / "base")
    from_dir = load_file(str(out / "adapter_model.safetensors"))
    assert from_dir.keys() == from_model.keys()
    for key in from_model:
        torch.testing.assert_close(from_dir[key], from_model[key], rtol=0, atol=0)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == \
        json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]


def test_refuses_a_directory_that_is_no_adapter(tmp_path):
    with pytest.raises(ValueError, match="no adapter_config.json"):
        save_per_expert_adapter(tmp_path, tmp_path / "out")


def test_a_saved_adapter_without_a_base_model_asks_for_one(tmp_path):
    _, peft_model = peft_pair("qwen3_moe", r=4, lora_alpha=8, target_modules="all-linear")
    peft_model.save_pretrained(tmp_path / "adapter")   # built from a config: no base_model_name_or_path
    with pytest.raises(ValueError, match="pass base_model="):
        save_per_expert_adapter(tmp_path / "adapter", tmp_path / "out")


def test_finds_the_peft_model_inside_a_wrapper_or_a_trainer(tmp_path):
    """DDP-style `.module` wrappers and trainers (`.model`) around the PEFT model are looked through."""
    _, peft_model = peft_pair("qwen3_moe", r=4, lora_alpha=8, target_modules="all-linear")

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Trainer:
        model = Wrapper(peft_model)

    direct = load_file(str(save_per_expert_adapter(peft_model, tmp_path / "a") / "adapter_model.safetensors"))
    via = load_file(str(save_per_expert_adapter(Trainer(), tmp_path / "b") / "adapter_model.safetensors"))
    assert via.keys() == direct.keys()
