"""On a CUDA machine: the non-expert part on the GPU, the experts (and their LoRA) on the CPU engine.

Skipped without CUDA. Both trainers run TRL's defaults (bf16 autocast, gradient checkpointing), so
the tolerance is that of BF16 training on both sides.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from trl import SFTTrainer

from kt_trl import KTConfig, KTSFTTrainer
from tests.helpers import expert_targets, sft_args, step_losses, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on a CUDA machine)"),
]


def gpu_args(output_dir, **overrides):
    return sft_args(output_dir, use_cpu=False, bf16=True, gradient_accumulation_steps=2, **overrides)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_gpu_parity_and_placement(family, tmp_path, tokenizer, dataset):
    model = tiny_model(family)
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets(family))
    plain = SFTTrainer(copy.deepcopy(model), gpu_args(tmp_path / "plain", family=family), train_dataset=dataset,
                       processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(peft_config))
    plain.train()
    kt = KTSFTTrainer(copy.deepcopy(model), gpu_args(tmp_path / "kt", family=family), dataset,
                      processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(peft_config),
                      kt_config=KTConfig(gpu_experts="none"))
    _assert_placement(kt.model)
    kt.train()
    _assert_placement(kt.model)
    torch.testing.assert_close(torch.tensor(step_losses(kt)), torch.tensor(step_losses(plain)), rtol=2e-2, atol=0.0)
    for param, state in kt.optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                assert value.device == param.device  # expert LoRA moments stay on the CPU with their params
    if "amx" in _cpu_features():  # an AMX Xeon: the engine must pick its AMX path
        assert kt.kt_report.isa == "amx"


def _assert_placement(model, gpu_layers=()):
    on_gpu = on_cpu = 0
    for name, param in model.named_parameters():
        if ".experts." in name and not any(f"layers.{i}." in name for i in gpu_layers):
            assert param.device.type == "cpu", f"{name} is on {param.device}"
            on_cpu += 1
        else:
            assert param.device.type == "cuda", f"{name} is on {param.device}"
            on_gpu += 1
    assert on_cpu and on_gpu


def _cpu_features():
    from kt_trl._native import runtime_info

    return " ".join(runtime_info().get("cpu_features", []))


@pytest.mark.parametrize("gpu_experts, gpu_layers", [("auto", (0, 1)), (8, (0,))])
def test_gpu_resident_experts_train_like_plain_peft(gpu_experts, gpu_layers, tmp_path, tokenizer, dataset):
    """Experts kept on the GPU (all of them where they fit, or a layer) train like plain PEFT there."""
    model = tiny_model("qwen3_moe")
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("qwen3_moe"))
    plain = SFTTrainer(copy.deepcopy(model), gpu_args(tmp_path / "plain"), train_dataset=dataset,
                       processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(peft_config))
    plain.train()
    kt = KTSFTTrainer(copy.deepcopy(model), gpu_args(tmp_path / "kt"), dataset, processing_class=copy.deepcopy(tokenizer),
                      peft_config=copy.deepcopy(peft_config), kt_config=KTConfig(gpu_experts=gpu_experts))
    assert kt.kt_report.gpu_layers == gpu_layers
    kt.train()
    on_gpu = [n for n, p in kt.model.named_parameters() if ".experts." in n and p.device.type == "cuda"]
    assert on_gpu and all(any(f"layers.{i}." in n for i in gpu_layers) for n in on_gpu)
    if len(gpu_layers) < 2:
        _assert_placement(kt.model, gpu_layers)
    torch.testing.assert_close(torch.tensor(step_losses(kt)), torch.tensor(step_losses(plain)), rtol=2e-2, atol=0.0)


def test_plan_counts_the_layers_kept_on_the_gpu(tmp_path):
    """The preflight plan makes prepare_model's choice of GPU layers: here every layer fits."""
    from peft import get_peft_model

    from kt_trl import plan
    from kt_trl.prepare import prepare_model
    from tests.helpers import tiny_config

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("qwen3_moe"))
    p = plan(tiny_config("qwen3_moe"), gpu_args(tmp_path), peft_config=peft_config, streamed=False)
    report = prepare_model(get_peft_model(tiny_model("qwen3_moe"), copy.deepcopy(peft_config)), device=torch.device("cuda"))
    assert p.gpu_layers == len(report.gpu_layers) == 2
    gpu = dict(p.gpu)
    assert gpu["routed experts of 2 layer(s) in transformers' path"] == report.gpu_expert_bytes
    assert not any(what.startswith("routed experts, packed") for what, _ in p.host)
