"""Layers whose experts stay in transformers' path (`KTConfig.gpu_experts`): the split, and training."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from kt_trl import KTConfig
from kt_trl.placement import activation_bytes
from kt_trl.prepare import prepare_model
from tests.helpers import expert_targets, tiny_model
from tests.test_trainer import assert_parity, expert_lora, train_pair


def lora_model(family="qwen3_moe"):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets(family))
    return get_peft_model(tiny_model(family), config)


@pytest.mark.parametrize("gpu_experts, on_device", [("none", ()), ("auto", ()), (8, (0,)), (12, (0,)), (16, (0, 1))])
def test_the_split_follows_gpu_experts(gpu_experts, on_device, caplog):
    model = lora_model()  # 2 MoE layers of 8 experts; no CUDA here, so "auto" keeps none
    with caplog.at_level(logging.WARNING, logger="kt_trl.placement"):
        report = prepare_model(model, KTConfig(gpu_experts=gpu_experts))
    assert report.gpu_layers == on_device
    assert report.layers_routed == tuple(i for i in (0, 1) if i not in on_device)
    assert ("whole layers" in caplog.text) == (gpu_experts == 12)
    layers = model.get_base_model().model.layers
    for i in on_device:  # transformers' own tensors, PEFT's own forward: nothing packed
        experts = layers[i].mlp.experts.base_layer.base_layer
        assert experts.gate_up_proj.stride()[0] > 0 and not hasattr(experts, "_kt_runner")
        assert not getattr(layers[i].mlp.experts, "_kt_routed", False)
    assert report.expert_lora_parameters == sum(n for name, n in report.expert_lora)
    assert all(f"layers.{i}." not in name for name, _ in report.expert_lora for i in on_device)
    assert prepare_model(model) is report  # idempotent with device layers too


@pytest.mark.parametrize("gpu_experts", [8, 16])
def test_training_with_device_layers_matches_plain_sft(gpu_experts, tmp_path, tokenizer, dataset):
    trainers = train_pair("qwen3_moe", tmp_path, tokenizer, dataset, expert_lora("qwen3_moe"),
                          kt_config=KTConfig(gpu_experts=gpu_experts))
    assert trainers["kt"][0].kt_report.gpu_layers == ((0,) if gpu_experts == 8 else (0, 1))
    assert_parity(trainers)


def test_device_layers_save_and_reload_with_plain_peft(tmp_path):
    model = lora_model()
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    prepare_model(model, KTConfig(gpu_experts=8))
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen3_moe"), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=2e-2, atol=2e-2)


def test_the_split_of_a_prepared_model_cannot_change():
    model = lora_model()
    prepare_model(model, KTConfig(gpu_experts=8))
    with pytest.raises(ValueError, match="cannot change afterwards"):
        prepare_model(model, KTConfig(gpu_experts="none"))


def test_activation_estimate_grows_with_tokens_and_without_checkpointing():
    model = tiny_model("qwen3_moe", num_hidden_layers=8)
    small, large = (activation_bytes(model, t, checkpointed=True) for t in (512, 4096))
    assert 0 < small < large and activation_bytes(model, 512, checkpointed=False) > small


def test_gpu_experts_is_validated():
    for bad in (-1, "all", 1.5, True):
        with pytest.raises(ValueError, match="gpu_experts"):
            KTConfig(gpu_experts=bad)
    copy.deepcopy(KTConfig(gpu_experts=0))
