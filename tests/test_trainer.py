"""KTSFTTrainer against plain trl.SFTTrainer on the same tiny model, data and seed.

Tolerance. The engine computes the experts in BF16 with FP32 accumulation (inputs, the gate/up
pre-activations and the output rounded to BF16); the plain model computes in FP32. To compare only
that, the plain model's expert weights are the same BF16-rounded values the engine holds. Per-step
losses then agree to `LOSS_RTOL` = 5e-3 relative (observed: <= 1e-3 over 5 steps, every family).
Every trainable parameter must change, and its total update must point the same way as the plain
run's: cosine similarity >= `UPDATE_MIN_COSINE` = 0.9 (observed >= 0.96; Adam normalises the tiny
early gradients of LoRA A, which B = 0 at init makes zero at step one, so BF16 noise shows there
most). Single-step gradients are compared tightly in tests/test_experts.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from trl import SFTTrainer

from kt_trl import KTConfig, KTSFTTrainer
from kt_trl.experts import expert_counters
from kt_trl.prepare import prepare_model
from tests.helpers import FAMILIES, VOCAB, expert_targets, sft_args, step_losses, tiny_model

LOSS_RTOL = 5e-3
UPDATE_MIN_COSINE = 0.9


def expert_lora(family: str, r: int = 4) -> LoraConfig:
    """LoRA on attention output, router-free, plus the routed experts."""
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj"], target_parameters=expert_targets(family))


def attention_lora(r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj"])


def train_pair(family, tmp_path, tokenizer, dataset, peft_config, *, kt_config=None, **arg_overrides):
    """Train plain SFTTrainer and KTSFTTrainer from identical copies; return both trainers and initial params."""
    model = tiny_model(family)
    trainers = {}
    for name, cls in (("plain", SFTTrainer), ("kt", KTSFTTrainer)):
        extra = {"kt_config": kt_config} if name == "kt" and kt_config is not None else {}
        trainer = cls(
            copy.deepcopy(model), sft_args(tmp_path / name, family, **arg_overrides), train_dataset=dataset,
            processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(peft_config), **extra,
        )
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        trainers[name] = (trainer, initial)
    return trainers


def assert_parity(trainers):
    (plain, plain_init), (kt, kt_init) = trainers["plain"], trainers["kt"]
    plain_losses, kt_losses = step_losses(plain), step_losses(kt)
    assert len(kt_losses) == len(plain_losses) >= 5
    torch.testing.assert_close(torch.tensor(kt_losses), torch.tensor(plain_losses), rtol=LOSS_RTOL, atol=0.0)
    plain_params = dict(plain.model.named_parameters())
    assert set(kt_init) == set(plain_init)
    for name, before in kt_init.items():
        after = dict(kt.model.named_parameters())[name].detach()
        update = (after - before).float().cpu()
        assert update.abs().max() > 0, f"{name} did not change"
        reference = (plain_params[name].detach() - plain_init[name]).float()
        cosine = torch.nn.functional.cosine_similarity(update.flatten(), reference.flatten(), dim=0)
        assert cosine >= UPDATE_MIN_COSINE, f"{name}: update direction differs (cosine {cosine:.3f})"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_expert_lora_checkpointing_accumulation(family, tmp_path, tokenizer, dataset):
    trainers = train_pair(family, tmp_path, tokenizer, dataset, expert_lora(family), gradient_accumulation_steps=2)
    assert_parity(trainers)
    kt = trainers["kt"][0]
    assert kt.kt_report.expert_lora_parameters > 0
    runners = [m._kt_runner for m in kt.model.modules() if hasattr(m, "_kt_runner")]
    # checkpointed layers reuse the first forward: one engine forward and one backward per micro-batch
    assert all(r.forward_calls == r.backward_calls == r.reused_forwards == 10 for r in runners)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parity_without_expert_lora_no_checkpointing(family, tmp_path, tokenizer, dataset):
    trainers = train_pair(family, tmp_path, tokenizer, dataset, attention_lora(), gradient_checkpointing=False)
    assert_parity(trainers)
    assert trainers["kt"][0].kt_report.expert_lora_parameters == 0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["gc", "no-gc"])
@pytest.mark.parametrize("accumulation", [1, 3], ids=["ga1", "ga3"])
@pytest.mark.parametrize("lora", ["experts", "all-linear"])
def test_parity_matrix(family, checkpointing, accumulation, lora, tmp_path, tokenizer, dataset):
    peft_config = expert_lora(family) if lora == "experts" else LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainers = train_pair(
        family, tmp_path, tokenizer, dataset, peft_config,
        gradient_checkpointing=checkpointing, gradient_accumulation_steps=accumulation,
    )
    assert_parity(trainers)


@pytest.mark.parametrize(
    "reuse, reentrant, calls",
    [(True, True, 5), (False, False, 10), (False, True, 10)],
    ids=["reuse-reentrant", "recompute", "recompute-reentrant"],
)
def test_parity_checkpointing_variants(reuse, reentrant, calls, tmp_path, tokenizer, dataset):
    trainers = train_pair(
        "qwen3_moe", tmp_path, tokenizer, dataset, expert_lora("qwen3_moe"),
        kt_config=KTConfig(reuse_checkpointed_activations=reuse),
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert_parity(trainers)
    runners = [m._kt_runner for m in trainers["kt"][0].model.modules() if hasattr(m, "_kt_runner")]
    assert all(r.forward_calls == calls and r.backward_calls == 5 for r in runners)  # 5 micro-batches


def test_parity_full_finetune_with_frozen_experts(tmp_path, tokenizer, dataset):
    model = tiny_model("qwen3_moe")
    for module in model.modules():
        if type(module).__name__.endswith("Experts"):
            module.requires_grad_(False)
    plain = SFTTrainer(copy.deepcopy(model), sft_args(tmp_path / "p", learning_rate=1e-3), train_dataset=dataset,
                       processing_class=copy.deepcopy(tokenizer))
    plain.train()
    kt = KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(tmp_path / "k", learning_rate=1e-3), dataset,
                      processing_class=copy.deepcopy(tokenizer), kt_config=KTConfig(freeze_experts=True))
    kt.train()
    torch.testing.assert_close(torch.tensor(step_losses(kt)), torch.tensor(step_losses(plain)), rtol=LOSS_RTOL, atol=0.0)


def test_positional_arguments(tmp_path, tokenizer, dataset):
    args = sft_args(tmp_path, max_steps=2)
    trainer = KTSFTTrainer(tiny_model("qwen3_moe"), args, dataset, processing_class=copy.deepcopy(tokenizer),
                           peft_config=expert_lora("qwen3_moe"))
    assert trainer.train_dataset is not None and trainer.args is args
    trainer.train()
    assert len(step_losses(trainer)) == 2


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def test_saved_adapter_loads_on_plain_transformers(tmp_path, tokenizer, dataset):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")  # attention + router + experts
    # bf16=False: SFTConfig's default bf16 autocast would stay wrapped around trainer.model's forward
    trainer = KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(tmp_path / "run", learning_rate=3e-2, bf16=False), dataset,
                           processing_class=copy.deepcopy(tokenizer), peft_config=peft_config)
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert any(".experts.lora_A" in key for key in saved) and any(".experts.base_layer.lora_B" in key for key in saved)

    # no special tokens in the input: the trained model's config now has a pad_token_id (SFTTrainer sets it)
    input_ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    trained = _logits(trainer.model, input_ids)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen3_moe"), str(tmp_path / "adapter"))  # no kt_trl inside
    expected = _logits(reloaded, input_ids)
    # the adapter is exactly what kt_trl trained: routed through the engine again, it gives the same logits
    rerouted = copy.deepcopy(reloaded)
    prepare_model(rerouted)
    torch.testing.assert_close(_logits(rerouted, input_ids), trained, rtol=0.0, atol=1e-5)
    # and plain transformers + PEFT agree up to BF16 expert compute; the tiny random routers are near-uniform,
    # so a few tokens flip an expert choice: compare the mean deviation, against the adapter's own effect
    effect = (expected - _logits(tiny_model("qwen3_moe"), input_ids)).abs().mean()
    assert (trained - expected).abs().mean() < 0.1 * effect


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path, tokenizer, dataset):
    def run(output_dir, **overrides):
        return KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(output_dir, max_steps=6, **overrides), dataset,
                            processing_class=copy.deepcopy(tokenizer), peft_config=expert_lora("qwen3_moe"))

    full = run(tmp_path / "full", save_strategy="steps", save_steps=3)
    full.train()
    resumed = run(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # the resumed log history starts with the checkpoint's three entries; the last three are new
    assert len(step_losses(resumed)) == len(step_losses(full)) == 6
    torch.testing.assert_close(torch.tensor(step_losses(resumed)[3:]), torch.tensor(step_losses(full)[3:]), rtol=1e-5, atol=0.0)
    # The engine's time per step counts from the resumed step on: the new lines add up to this run's engine time.
    counters = expert_counters(resumed.model)
    new_lines = [h for h in resumed.state.log_history if "loss" in h][3:]
    assert sum(h["kt_cpu_experts_s"] for h in new_lines) == pytest.approx(
        counters["forward_seconds"] + counters["backward_seconds"], abs=1e-3)


@pytest.mark.parametrize("lora", ["attention", "experts"])
def test_gpt_oss_parity(lora, tmp_path, tokenizer, dataset):
    # gpt-oss experts (transposed, interleaved, biased, clamped SwiGLU) on the engine, with LoRA on
    # attention only or on the experts too (PEFT reads its transposed parameters as [E, in, out])
    config = attention_lora() if lora == "attention" else expert_lora("gpt_oss")
    trainers = train_pair("gpt_oss", tmp_path, tokenizer, dataset, config)
    assert_parity(trainers)
    assert trainers["kt"][0].kt_report.layers_routed == (0, 1)
    assert (trainers["kt"][0].kt_report.expert_lora_parameters > 0) == (lora == "experts")


def test_training_logs_say_how_long_the_engine_took(tmp_path, tokenizer, dataset):
    trainer = KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(tmp_path, max_steps=4, logging_steps=2), dataset,
                           processing_class=tokenizer, peft_config=expert_lora("qwen3_moe"))
    output = trainer.train()
    lines = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in lines] == [2, 4]
    assert all(h["kt_cpu_experts_s"] > 0 and "kt_transfer_s" not in h for h in lines)  # on the CPU: no copies
    # Per-step averages of time spent inside the training steps.
    logged = sum(2 * h["kt_cpu_experts_s"] for h in lines)
    assert logged < output.metrics["train_runtime"]
    counters = expert_counters(trainer.model)  # every engine call of the run, each step's in one line
    assert logged == pytest.approx(counters["forward_seconds"] + counters["backward_seconds"], abs=1e-3)
    assert not any("kt_cpu_experts_s" in h for h in trainer.state.log_history if "loss" not in h)
