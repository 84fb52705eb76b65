"""Full (non-PEFT) state dicts of a prepared model carry the engine's expert weights, both ways."""

from __future__ import annotations

import copy

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
