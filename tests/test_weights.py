"""Full (non-PEFT) state dicts of a prepared model carry the engine's expert weights, both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from kt_trl import KTConfig
from kt_trl.prepare import prepare_model
from tests.helpers import VOCAB, expert_targets, tiny_model

FROZEN = KTConfig(freeze_experts=True)


def logits(model):
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_state_dict_has_the_engine_weights():
    model = tiny_model("mixtral")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    prepare_model(model, FROZEN)
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key].float(), value, rtol=0, atol=0)  # BF16-exact weights


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model("qwen3_moe")
    reference = logits(model)
    prepare_model(model, FROZEN)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers, no kt_trl
    torch.testing.assert_close(logits(reloaded), reference)
    assert reloaded.config._experts_implementation != "kt_cpu"


def test_load_state_dict_repacks_the_engine():
    source, target = tiny_model("olmoe", seed=1), tiny_model("olmoe", seed=2)
    prepare_model(target, FROZEN)
    result = target.load_state_dict(source.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    routed = copy.deepcopy(source)
    prepare_model(routed, FROZEN)
    torch.testing.assert_close(logits(target), logits(routed), rtol=0, atol=0)


def test_peft_state_dict_keeps_placeholders():
    model = get_peft_model(tiny_model("qwen3_moe"), LoraConfig(target_parameters=expert_targets("qwen3_moe")))
    prepare_model(model)
    state = model.state_dict()
    placeholder = state["base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj"]
    assert placeholder.stride() == (0, 0, 0)  # no unpacked copy made


def lora_pair(family="qwen3_moe"):
    """(plain, kt) PeftModels with the same random non-zero LoRA on attention and experts."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets(family),
                        init_lora_weights=False)
    torch.manual_seed(3)
    plain = get_peft_model(tiny_model(family), config)
    kt = copy.deepcopy(plain)
    prepare_model(kt)
    return plain, kt


def expert_weights(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.state_dict().items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}


def test_unload_saves_the_base_experts(tmp_path):
    plain, kt = lora_pair()
    kt.unload().save_pretrained(tmp_path)
    reloaded = expert_weights(AutoModelForCausalLM.from_pretrained(tmp_path))
    expected = expert_weights(plain.unload())
    assert reloaded.keys() == expected.keys() and len(expected) == 4
    for name, value in expected.items():
        assert value.abs().sum() > 0
        torch.testing.assert_close(reloaded[name], value, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])   # gpt-oss: transposed, gate / up interleaved
def test_merge_and_unload_saves_the_merged_experts(family, tmp_path):
    plain, kt = lora_pair(family)
    unmerged = logits(kt)
    torch.testing.assert_close(logits(plain), unmerged, rtol=0.02, atol=0.02)
    merged_plain = plain.merge_and_unload()
    merged_kt = kt.merge_and_unload()
    assert merged_kt.config._experts_implementation == "kt_cpu"   # still the engine, now with W + s·B·A
    torch.testing.assert_close(logits(merged_kt), unmerged, rtol=0.02, atol=0.02)
    merged_kt.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)     # plain transformers, per-expert keys on disk
    expected = merged_plain.state_dict()
    for name, value in reloaded.state_dict().items():
        if ".experts." in name:  # the BF16 rounding of W + delta W, once
            torch.testing.assert_close(value, expected[name], rtol=1e-2, atol=1e-2)
            if not name.endswith("_bias"):   # (gpt-oss's biases have no LoRA)
                assert not torch.equal(value, tiny_model(family).state_dict()[name])  # the LoRA is in
    torch.testing.assert_close(logits(reloaded), logits(merged_plain), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merge_adapter_and_unmerge_keep_the_outputs(family):
    _, kt = lora_pair(family)
    before = logits(kt)
    kt.merge_adapter()
    torch.testing.assert_close(logits(kt), before, rtol=0.02, atol=0.02)
    kt.unmerge_adapter()
    torch.testing.assert_close(logits(kt), before, rtol=0.02, atol=0.02)
    with kt.disable_adapter():
        disabled = logits(kt)
    assert not torch.allclose(disabled, before, rtol=0.02, atol=0.02)


def test_merging_into_int8_experts_gives_bf16_experts_of_the_dequantized_weights_plus_the_delta(caplog):
    from kt_trl.lora import expert_lora_factors

    plain, _ = lora_pair()
    kt = copy.deepcopy(plain)
    prepare_model(kt, KTConfig(expert_format="int8"))
    expected = []   # per layer: bf16(W_int8 dequantized + s·B_e·A_e), as the merge computes it
    for module in kt.modules():
        if hasattr(module, "_kt_wrappers"):
            engine = module.get_base_layer()._kt_runner.engine
            assert engine.format == "int8"
            weights = dict(zip(("gate_up_proj", "down_proj"), engine.unpack()))
            for name, wrapper in module._kt_wrappers.items():
                lora = expert_lora_factors(wrapper, "default")
                delta = lora.scale * (lora.B.detach().float() @ lora.A.detach().float())
                weights[name] = (weights[name].float() + delta).bfloat16()
            expected.append((weights["gate_up_proj"], weights["down_proj"]))
    before = logits(kt)
    with caplog.at_level("WARNING", logger="kt_trl"):
        merged = kt.merge_and_unload()
    assert "8-bit codes cannot hold W + s·B·A" in caplog.text
    engines = [m._kt_runner.engine for m in merged.modules() if hasattr(m, "_kt_runner")]
    assert len(engines) == len(expected) == 2 and {e.format for e in engines} == {"bf16"}
    for engine, (gate_up, down) in zip(engines, expected):
        merged_gate_up, merged_down = engine.unpack()
        assert torch.equal(merged_gate_up, gate_up) and torch.equal(merged_down, down)
    torch.testing.assert_close(logits(merged), before, rtol=0.02, atol=0.02)
