"""Helpers the tests share: tiny MoE models of every supported family, the SFTConfig of the trainer
tests, PEFT model pairs, batches and the gradient tolerance."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from kt_trl.config import KTConfig
from kt_trl.prepare import prepare_model

VOCAB = 384
_COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)

# family -> (config class name, family-specific kwargs). Every MoE layer has 8 experts, top-2, I = 16.
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                                         num_experts_per_tok=2, head_dim=8, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=32)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             first_k_dense_replace=1, num_hidden_layers=3, **_MLA)),
    "deepseek_v2": ("DeepseekV2Config", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                             n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                             num_hidden_layers=3, **_MLA)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
                                       n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                       head_dim=8, num_hidden_layers=3)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, moe_num_experts=8,
                                                moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1)),
    "minimax_m2": ("MiniMaxM2Config", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", dict(intermediate_size=16, num_experts=8, moe_topk=2, head_dim=8)),
    "granitemoe": ("GraniteMoeConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2)),
}
# gpt-oss: transposed, interleaved, biased experts with a clamped SwiGLU ("all-linear" reaches no expert).
EXTRA_FAMILIES = {
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
                                     layer_types=["sliding_attention", "full_attention"])),
}
# Where PEFT's "all-linear" does not reach the fused experts, the tests name them explicitly.
EXPERT_TARGETS = {
    "granitemoe": ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"],
}
DEFAULT_EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_config(family: str, **overrides):
    """A tiny config of `family` (see FAMILIES)."""
    class_name, kwargs = {**FAMILIES, **EXTRA_FAMILIES}[family]
    return getattr(transformers, class_name)(**{**_COMMON, **kwargs, **overrides})


def tiny_model(family: str, *, seed: int = 0, bf16_experts: bool = True, **overrides):
    """A tiny random model of `family`; expert weights rounded to BF16 values (what the engine holds)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    if bf16_experts:
        round_experts_to_bf16(model)
    return model


def round_experts_to_bf16(model) -> None:
    with torch.no_grad():
        for module in model.modules():
            for name in ("gate_up_proj", "down_proj"):
                param = getattr(module, name, None)
                if isinstance(param, torch.Tensor) and param.dim() == 3:
                    param.copy_(param.to(torch.bfloat16).to(param.dtype))


def expert_targets(family: str) -> list[str]:
    return EXPERT_TARGETS.get(family, DEFAULT_EXPERT_TARGETS)


def sft_args(output_dir, family: str = "qwen3_moe", **overrides):
    """A fast, deterministic SFTConfig for the tiny models."""
    from trl import SFTConfig

    kwargs = dict(
        output_dir=str(output_dir), max_steps=5, per_device_train_batch_size=4, gradient_accumulation_steps=1,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, max_length=48, save_strategy="no",
        report_to="none", seed=0, use_cpu=True, disable_tqdm=True, gradient_checkpointing=True,
        dataloader_num_workers=0,
    )
    if family == "granitemoe":
        # trl 1.16 reads config.num_experts for the aux loss, which GraniteMoeConfig lacks (trl bug, both trainers).
        kwargs["router_aux_loss_coef"] = 0.0
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def step_losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


# BF16 compute vs FP32 (same BF16-rounded weights): relative error of a whole gradient tensor.
GRAD_RTOL = 3e-2


def runners(model):
    return [m._kt_runner for m in model.modules() if hasattr(m, "_kt_runner")]


def peft_pair(family: str, *, router: bool = True, kt_config: KTConfig | None = None):
    """(plain, kt) PeftModels with random non-zero LoRA on o_proj, router and experts."""
    targets = ["o_proj"] + (["gate"] if router and family != "granitemoe" else [])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, target_parameters=expert_targets(family),
                        init_lora_weights=False)
    torch.manual_seed(1)
    plain = get_peft_model(tiny_model(family), config)
    kt = copy.deepcopy(plain)
    prepare_model(kt, kt_config)
    return plain, kt


def batch(seed: int = 0, shape=(2, 24)):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, shape, generator=generator)
    return {"input_ids": ids, "labels": ids}


def benchmark_module(name: str):
    """`benchmarks/<name>.py` imported as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
