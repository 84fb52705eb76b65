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
    # Beside a GPU the logs also say how long the copies took (kt_trl.step_log).
    assert all(h["kt_cpu_experts_s"] > 0 and h["kt_transfer_s"] > 0 for h in kt.state.log_history if "loss" in h)
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
    p = plan(tiny_config("qwen3_moe"), gpu_args(tmp_path), peft_config=peft_config)
    report = prepare_model(get_peft_model(tiny_model("qwen3_moe"), copy.deepcopy(peft_config)), device=torch.device("cuda"))
    assert p.gpu_layers == report.gpu_layers == (0, 1)
    gpu = dict(p.gpu)
    assert gpu["routed experts of 2 layer(s) in transformers' path"] == report.gpu_expert_bytes
    assert not any(what.startswith("routed experts, packed") for what, _ in p.host)


@pytest.mark.parametrize("gpu_experts, gpu_layers", [("auto", (0, 1)), (8, (0,))])
def test_a_checkpoint_loads_its_gpu_layers_onto_the_gpu(gpu_experts, gpu_layers, tmp_path, tokenizer, dataset):
    """load_model reads the planned GPU layers there; the trainer given the directory trains like the
    trainer given the model from_pretrained loaded."""
    from transformers import AutoModelForCausalLM

    from kt_trl import load_model

    path = tmp_path / "ckpt"
    tiny_model("qwen3_moe").save_pretrained(path, max_shard_size="40KB")
    config = KTConfig(gpu_experts=gpu_experts)
    loaded = load_model(path, kt_config=config, args=gpu_args(tmp_path / "load"))
    for i in (0, 1):
        experts = loaded.get_submodule(f"model.layers.{i}.mlp.experts")
        assert (experts.gate_up_proj.device.type == "cuda") == (i in gpu_layers)
        assert hasattr(experts, "_kt_engine") == (i not in gpu_layers)
    del loaded
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("qwen3_moe"))
    losses = []
    for name, model in (("dir", str(path)), ("model", AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))):
        trainer = KTSFTTrainer(model, gpu_args(tmp_path / name), dataset, processing_class=copy.deepcopy(tokenizer),
                               peft_config=copy.deepcopy(peft_config), kt_config=config)
        assert trainer.kt_report.gpu_layers == gpu_layers
        trainer.train()
        losses.append(torch.tensor(step_losses(trainer)))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-3, atol=0.0)


def test_fp8_experts_are_dequantized_on_the_gpu_as_on_the_cpu(tmp_path):
    from kt_trl import load_model
    from tests.test_loading import write_fp8

    write_fp8(tmp_path / "fp8", block=16)
    config = KTConfig(gpu_experts=8)   # layer 1, the first of MoE layers 1, 2
    on_gpu = load_model(tmp_path / "fp8", kt_config=config, args=gpu_args(tmp_path / "gpu"))
    on_cpu = load_model(tmp_path / "fp8", kt_config=config, args=sft_args(tmp_path / "cpu", "deepseek_v3"))
    for name in ("gate_up_proj", "down_proj"):
        ours = on_gpu.get_parameter(f"model.layers.1.mlp.experts.{name}")
        assert ours.device.type == "cuda"
        assert torch.equal(ours.cpu(), on_cpu.get_parameter(f"model.layers.1.mlp.experts.{name}"))
