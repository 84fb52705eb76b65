"""kt_trl.plan (kt_trl/preflight.py) against what preparation and training actually allocate, and its refusals.

The module is `preflight`, not `plan`: a submodule named like the package's `plan` function would
replace that function as the package attribute once imported.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
from peft import LoraConfig, get_peft_model

from kt_trl import KTConfig, KTSFTTrainer, load_model, plan
from kt_trl.prepare import prepare_model
from kt_trl.preflight import Plan
from tests.helpers import VOCAB, expert_targets, sft_args, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("cpu_only")  # load_model / plan on a GPU host place experts there

PACKED = "routed experts, packed BF16"
KEPT = "kept activations (checkpointing)"


def lora(family: str, r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj"], target_parameters=expert_targets(family))


def rows(p: Plan) -> dict[str, int]:
    return dict(p.host)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_counts_match_the_prepared_model(family, tmp_path):
    config = tiny_config(family)
    p = plan(config, sft_args(tmp_path, family), peft_config=lora(family))
    model = get_peft_model(tiny_model(family), lora(family))
    report = prepare_model(model)
    assert p.family == report.family and p.shape[0] == len(report.layers_routed) and p.shape[1] == 8
    lines = rows(p)
    assert lines[PACKED] == report.packed_bytes
    assert lines["expert LoRA r4 (+ grad, AdamW; FP32)"] == 16 * report.expert_lora_parameters
    attention = dict(report.adapters)["attention"]
    assert lines["other LoRA r4 (+ grad, AdamW; FP32)"] == 16 * attention   # no GPU here: on the host
    experts = {id(q) for m in model.modules() if type(m).__name__.endswith("Experts")
               for q in m.parameters(recurse=False)}
    other = sum(q.numel() for n, q in model.named_parameters() if id(q) not in experts and "lora_" not in n)
    assert lines["other weights (4 bytes each)"] == 4 * other


@pytest.mark.parametrize("gpu_experts, on_device", [(8, 1), (16, 2), ("none", 0)])
def test_layers_kept_on_the_device_leave_the_engine(gpu_experts, on_device, tmp_path):
    kt_config = KTConfig(gpu_experts=gpu_experts)
    p = plan(tiny_config("qwen3_moe"), sft_args(tmp_path), kt_config, peft_config=lora("qwen3_moe"))
    model = get_peft_model(tiny_model("qwen3_moe"), lora("qwen3_moe"))
    report = prepare_model(model, kt_config)
    assert p.gpu_layers == report.gpu_layers and len(p.gpu_layers) == on_device
    lines = rows(p)  # no GPU here: the device's share is host memory too
    assert lines.get(PACKED, 0) == report.packed_bytes
    assert lines.get("expert LoRA r4 (+ grad, AdamW; FP32)", 0) == 16 * report.expert_lora_parameters
    assert lines.get(f"routed experts of {on_device} layer(s) in transformers' path", 0) == report.gpu_expert_bytes
    kept_lora = sum(q.numel() for n, q in model.named_parameters() if ".experts." in n and "lora_" in n)
    assert lines.get("their expert LoRA r4 (+ grad, AdamW; FP32)", 0) == 16 * (kept_lora - report.expert_lora_parameters)
    assert ("keep their experts on the training device" in str(p)) == bool(on_device)


@pytest.mark.parametrize("format", ["fp8", "int8"])
def test_8bit_expert_bytes_match_the_prepared_model(format, tmp_path):
    kt_config = KTConfig(expert_format=format)
    p = plan(tiny_config("qwen3_moe"), sft_args(tmp_path), kt_config)
    report = prepare_model(tiny_model("qwen3_moe"), KTConfig(expert_format=format, freeze_experts=True))
    assert report.expert_format == format
    assert rows(p)[f"routed experts, packed {format.upper()}"] == report.packed_bytes
    assert report.packed_bytes < rows(plan(tiny_config("qwen3_moe"), sft_args(tmp_path)))[PACKED]


def test_kept_activations(tmp_path, tokenizer, dataset):
    family, r = "qwen3_moe", 4
    args = sft_args(tmp_path, max_steps=1, per_device_train_batch_size=2)
    T, k, H, I, layers = 2 * 48, 2, 32, 16, 2
    p = plan(tiny_config(family), args, peft_config=lora(family, r))
    assert p.tokens == T and rows(p)[KEPT] == layers * (T * k * 8 + T * H * 2 + T * k * 2 * I * 2 + T * k * 2 * r * 4)
    assert KEPT not in rows(plan(tiny_config(family), args, KTConfig(reuse_checkpointed_activations=False)))
    assert rows(plan(tiny_config(family), args, KTConfig(max_kept_activations_gb=1e-6)))[KEPT] == 1000
    assert KEPT not in rows(plan(tiny_config(family), sft_args(tmp_path, gradient_checkpointing=False)))
    # what one training step keeps (padded batches are at most T tokens) stays within the plan
    from kt_trl.experts import expert_counters

    trainer = KTSFTTrainer(tiny_model(family), args, dataset, processing_class=copy.deepcopy(tokenizer),
                           peft_config=lora(family, r))
    trainer.train()
    assert 0 < expert_counters(trainer.model)["kept_activation_peak_bytes"] <= rows(p)[KEPT]


def test_table_and_flags(tmp_path):
    p = plan(tiny_config("qwen3_moe"), sft_args(tmp_path), peft_config=lora("qwen3_moe"))
    text = str(p)
    assert text.startswith("kt_trl plan: qwen3_moe (Qwen3-MoE), 2 MoE layers x E 8, H 32, I 16, top-2")
    assert PACKED in text and "total / available" in text and "fits" in text
    assert p.host_fits and p.gpu_fits is None and p.gpu == ()   # no GPU on this machine
    p.check()


def test_check_names_the_knob(tmp_path):
    p = plan(tiny_config("qwen3_moe"), sft_args(tmp_path), peft_config=lora("qwen3_moe"))
    short = dataclasses.replace(p, host_available=p.host_bytes - rows(p)[KEPT] // 2)
    assert not short.host_fits
    knobs = r"per_device_train_batch_size or max_length.*max_kept_activations_gb="
    with pytest.raises(ValueError, match=knobs) as info:
        short.check()
    assert "smaller LoRA rank than r=4" in str(info.value) and "DOES NOT FIT" in str(info.value)
    with pytest.raises(ValueError, match="a smaller model"):
        dataclasses.replace(p, host_available=rows(p)[PACKED] // 2).check()


def test_plan_reads_only_the_config(tmp_path):
    tiny_config("deepseek_v3").save_pretrained(tmp_path)   # a directory with config.json and no weights
    p = plan(tmp_path)
    assert p.model == str(tmp_path) and p.shape[0] == 2   # DeepSeek-V3's first layer is dense
    fp8 = json.loads((tmp_path / "config.json").read_text())
    fp8["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(fp8))
    kept = dict(plan(tmp_path).host)   # FP8 on disk stays FP8 in the engine ("auto")
    assert kept["routed experts, packed FP8"] < 0.6 * rows(p)[PACKED]
    assert plan(tmp_path, kt_config=KTConfig(expert_format="bf16")).host == p.host   # dequantized: as BF16


def test_dense_model_is_refused():
    import transformers

    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="no routed experts"):
        plan(config)


def test_load_model_checks_the_plan_before_reading(tmp_path, monkeypatch, caplog):
    tiny_model("qwen3_moe").save_pretrained(tmp_path, max_shard_size="40KB")
    for shard in tmp_path.glob("model-*.safetensors"):
        shard.unlink()   # reading anything would fail on a missing shard
    with caplog.at_level("INFO", logger="kt_trl.loading"):
        with pytest.raises(FileNotFoundError, match="missing"):
            load_model(tmp_path)
    assert "kt_trl plan: " in caplog.text and PACKED in caplog.text   # the table, logged before that
    monkeypatch.setattr("kt_trl.preflight._host_available", lambda: 1)
    with pytest.raises(ValueError, match="kt_trl plan: .* GB of host memory"):
        load_model(tmp_path)


def test_trainer_given_a_name_plans_first(tmp_path, monkeypatch, tokenizer, dataset):
    tiny_config("qwen3_moe").save_pretrained(tmp_path / "ckpt")   # no weights: the plan must refuse first
    monkeypatch.setattr("kt_trl.preflight._host_available", lambda: 1)
    with pytest.raises(ValueError, match="per_device_train_batch_size or max_length"):
        KTSFTTrainer(str(tmp_path / "ckpt"), sft_args(tmp_path / "run"), dataset,
                     processing_class=copy.deepcopy(tokenizer), peft_config=lora("qwen3_moe"))
