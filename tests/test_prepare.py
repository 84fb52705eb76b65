"""prepare_model: idempotency, the RoutingReport, released weights, placement, refusals."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from kt_trl import KTConfig, KTSFTTrainer
from kt_trl.prepare import prepare_model
from tests.helpers import VOCAB, expert_targets, sft_args, tiny_model


def all_linear(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))


def experts_modules(model):
    return [m for m in model.modules() if hasattr(m, "_kt_runner")]


@pytest.mark.parametrize("enabled", [True, False])
def test_packing_shows_a_progress_bar_unless_disabled(capsys, enabled):
    model = tiny_model("qwen3_moe")  # two MoE layers to pack
    if not enabled:
        transformers.utils.logging.disable_progress_bar()
    try:
        prepare_model(model, KTConfig(freeze_experts=True))
    finally:
        transformers.utils.logging.enable_progress_bar()
    shown = "Packing experts for the CPU engine" in capsys.readouterr().err
    assert shown == enabled


def test_prepare_twice_is_a_noop():
    model = all_linear(tiny_model("qwen3_moe"))
    report = prepare_model(model)
    engines = [m._kt_runner.engine for m in experts_modules(model)]
    forwards = [m.forward for m in model.modules() if getattr(m, "_kt_routed", False)]
    assert prepare_model(model) is report
    assert [m._kt_runner.engine for m in experts_modules(model)] == engines
    assert [m.forward for m in model.modules() if getattr(m, "_kt_routed", False)] == forwards


def test_report_lists_what_was_routed_and_what_trains():
    model = all_linear(tiny_model("deepseek_v3"))  # layer 0 is dense (first_k_dense_replace=1)
    report = prepare_model(model)
    assert report.family == "DeepSeek-V3"
    assert report.layers_routed == (1, 2) and report.experts_per_layer == (8, 8)
    assert report.packed_bytes >= 2 * 8 * (2 * 16 * 32 + 32 * 16) * 2  # two layers of BF16 experts
    assert report.isa in ("amx", "avx512", "avx2", "scalar")
    expert_lora = {n: p.numel() for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert dict(report.expert_lora) == expert_lora and len(expert_lora) == 2 * 4  # 2 layers x (A, B) x 2
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.trainable_parameters == trainable  # expert LoRA included
    groups = dict(report.adapters)
    assert groups["experts"] == sum(expert_lora.values())
    # What "all-linear" covers depends on the PEFT release (0.21 left out the shared experts and
    # the dense MLP of layer 0, 0.22 adapts them): the report names what the model has.
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    has = {"shared experts": any(".shared_experts." in n for n in lora),
           "dense mlp": any(".layers.0.mlp." in n for n in lora)}
    assert set(groups) == {"attention", "router", "experts"} | {g for g, yes in has.items() if yes}
    assert report.untrained_groups == tuple(g for g, yes in has.items() if not yes)
    line = report.adapters_line()
    assert "experts 11,264" in line and f"{trainable:,}" in line


def test_report_names_the_groups_that_train_nothing():
    model = get_peft_model(tiny_model("deepseek_v3"), LoraConfig(
        r=4, lora_alpha=8, target_modules=["o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    report = prepare_model(model)
    assert {g for g, _ in report.adapters} == {"attention", "experts"}
    assert report.untrained_groups == ("router", "shared experts", "dense mlp")
    assert "no adapters on router, shared experts, dense mlp" in report.adapters_line()


def test_expert_weights_are_released():
    model = tiny_model("mixtral")
    original = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    prepare_model(model, KTConfig(freeze_experts=True))
    experts = model.model.layers[0].mlp.experts
    for param in (experts.gate_up_proj, experts.down_proj):
        assert param.stride() == (0, 0, 0) and param.untyped_storage().nbytes() <= 4
    gate_up, _ = experts._kt_runner.engine.unpack()
    torch.testing.assert_close(gate_up.float(), original, rtol=0, atol=0)  # BF16-exact values went in


def test_experts_stay_on_cpu_through_moves_and_casts():
    model = all_linear(tiny_model("qwen3_moe"))
    prepare_model(model)
    model.to(torch.float64)
    model.to("meta")  # stands in for .to("cuda") on a machine without a GPU
    for name, param in model.named_parameters():
        if ".experts." in name:
            assert param.device.type == "cpu", name
            assert param.dtype == torch.float32, name  # not cast to float64 either
        else:
            assert param.device.type == "meta", name


def test_generation_runs_after_prepare():
    model = tiny_model("qwen3_moe")
    prepare_model(model, KTConfig(freeze_experts=True))
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_adapters_added_after_prepare_are_bound():
    model = tiny_model("qwen3_moe")
    model.requires_grad_(False)
    first = prepare_model(model)
    peft_model = get_peft_model(model, LoraConfig(target_parameters=expert_targets("qwen3_moe")))
    second = prepare_model(peft_model)
    assert second is not first and second.expert_lora_parameters > 0
    assert all(getattr(m.mlp.experts, "_kt_routed", False) for m in model.model.layers)


def test_dense_model_is_refused():
    config = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="has no routed experts.*plain trl.SFTTrainer.*Qwen3-MoE"):
        prepare_model(transformers.AutoModelForCausalLM.from_config(config))


def test_unknown_moe_family_is_refused():
    config = transformers.PhimoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="'phimoe'.*not in kt_trl's registry; supported families: Qwen3-MoE"):
        prepare_model(transformers.AutoModelForCausalLM.from_config(config))


def _randomize_biases(model):
    """gpt-oss initialises expert biases to zero; give them values so the bias path is exercised."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for name in ("gate_up_proj_bias", "down_proj_bias"):
                bias = getattr(layer.mlp.experts, name)
                bias.copy_(torch.randn(bias.shape, generator=gen) * 0.5)


def test_gpt_oss_routes_with_its_own_expert_layout():
    model = tiny_model("gpt_oss")
    _randomize_biases(model)
    experts = model.model.layers[0].mlp.experts
    gen = torch.Generator().manual_seed(0)
    # BF16-valued inputs, as the engine computes in BF16 (FP32 accumulation) against the FP32 HF loop
    x = torch.randn(24, 32, generator=gen).bfloat16().float()
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(24)])
    w = torch.rand(24, 2, generator=gen)
    with torch.no_grad():
        expected = experts(x, ids, w)
        weights = {name: getattr(experts, name).clone() for name in ("gate_up_proj", "down_proj")}
    report = prepare_model(model, KTConfig(freeze_experts=True))
    assert report.layers_routed == (0, 1)
    with torch.no_grad():
        got = experts(x, ids, w)
    assert ((got - expected).norm() / expected.norm()) < 1e-2
    state = model.state_dict()   # the engine's weights, back in gpt-oss's transposed, interleaved layout
    for name, value in weights.items():
        assert torch.equal(state[f"model.layers.0.mlp.experts.{name}"], value)


def test_non_silu_experts_are_refused():
    with pytest.raises(ValueError, match="experts layout the CPU engine runs.*hidden_act must be 'silu'"):
        prepare_model(tiny_model("mixtral", hidden_act="gelu"), KTConfig(freeze_experts=True))


def test_trainable_expert_weights_are_refused_unless_frozen():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="require gradients.*KTConfig\\(freeze_experts=True\\)"):
        prepare_model(model)
    assert model.model.layers[0].mlp.experts.gate_up_proj.stride() != (0, 0, 0)  # refused before touching it
    report = prepare_model(model, KTConfig(freeze_experts=True))
    assert "experts" not in dict(report.adapters)


def test_all_linear_without_expert_lora_is_refused(tmp_path, tokenizer, dataset):
    # PEFT maps "all-linear" onto the fused experts of most families, but not onto gpt-oss's
    with pytest.raises(ValueError, match="adapted no expert of this gpt-oss model.*target_parameters="):
        KTSFTTrainer(tiny_model("gpt_oss"), sft_args(tmp_path), dataset, processing_class=copy.deepcopy(tokenizer),
                     peft_config=LoraConfig(target_modules="all-linear"))


def test_unwrapped_value_head_container():
    class ValueHead(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.pretrained_model = model
            self.v_head = torch.nn.Linear(32, 1)

    model = all_linear(tiny_model("qwen3_moe"))
    report = prepare_model(ValueHead(model))
    assert report.layers_routed == (0, 1) and prepare_model(model) is report



def test_experts_the_implementation_switch_cannot_reach_are_refused_untouched():
    model = tiny_model("qwen3_moe")
    experts = model.model.layers[1].mlp.experts
    experts.config = copy.deepcopy(model.config)  # a config set_experts_implementation does not update
    before = model.config._experts_implementation
    with pytest.raises(ValueError, match="layers.1.*does not reach this experts module.*nothing was changed"):
        prepare_model(model, KTConfig(freeze_experts=True))
    assert model.config._experts_implementation == before
    assert all(layer.mlp.experts.gate_up_proj.stride() != (0, 0, 0) for layer in model.model.layers)


def test_gpt_oss_load_state_dict_repacks_weights_and_biases():
    model, fresh = tiny_model("gpt_oss"), tiny_model("gpt_oss", seed=1)
    prepare_model(model, KTConfig(freeze_experts=True))
    _randomize_biases(fresh)
    state = fresh.state_dict()
    model.load_state_dict(state)   # experts of the other seed, in gpt-oss's layout, biases included
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=gen).bfloat16().float()
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(16)])
    w = torch.rand(16, 2, generator=gen)
    with torch.no_grad():
        expected = fresh.model.layers[1].mlp.experts(x, ids, w)
        got = model.model.layers[1].mlp.experts(x, ids, w)
    assert ((got - expected).norm() / expected.norm()) < 1e-2


def test_a_new_config_on_a_prepared_model_is_applied():
    from kt_trl._native import configure, runtime_info

    model = tiny_model("qwen3_moe")
    first = prepare_model(model, KTConfig(freeze_experts=True))
    assert first.reuse_checkpointed_activations
    try:
        report = prepare_model(model, KTConfig(isa="scalar", threads=1, reuse_checkpointed_activations=False,
                                               freeze_experts=True))
        assert (report.isa, report.threads, report.reuse_checkpointed_activations) == ("scalar", 1, False)
        assert runtime_info()["isa"] == "scalar" and runtime_info()["threads"] == 1
        runners = [m._kt_runner for m in experts_modules(model)]
        assert all(not r.config.reuse_checkpointed_activations for r in runners)
        assert len({id(r.pending.budget) for r in runners}) == 1  # still one model-wide budget
        assert prepare_model(model) is report  # no config: the model keeps the one it has
    finally:
        configure(isa="auto", threads=2)


def test_a_second_trainer_keeps_or_applies_the_config(tmp_path, tokenizer, dataset):
    model = tiny_model("qwen3_moe")
    args = sft_args(tmp_path)
    first = KTSFTTrainer(model, args, dataset, processing_class=copy.deepcopy(tokenizer),
                         kt_config=KTConfig(reuse_checkpointed_activations=False, freeze_experts=True))
    second = KTSFTTrainer(first.model, args, dataset, processing_class=copy.deepcopy(tokenizer))
    assert second.kt_config == first.kt_config and not second.kt_report.reuse_checkpointed_activations
    third = KTSFTTrainer(first.model, args, dataset, processing_class=copy.deepcopy(tokenizer),
                         kt_config=KTConfig(freeze_experts=True))
    assert third.kt_report.reuse_checkpointed_activations


def test_float32_experts_are_announced_once(caplog):
    model = tiny_model("qwen3_moe")
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="kt_trl.prepare"):
        prepare_model(model, KTConfig(freeze_experts=True))
        prepare_model(model)
    assert [r.getMessage().count("float32") for r in caplog.records] == [2]
    assert "computes them in BF16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kt_trl.prepare"):
        prepare_model(tiny_model("qwen3_moe").to(torch.bfloat16), KTConfig(freeze_experts=True))
    assert "BF16" not in caplog.text


def test_a_model_without_weights_is_refused_with_what_to_do():
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_model("qwen3_moe").config)
    with pytest.raises(ValueError, match="meta device.*kt_trl.load_model.*install_engine"):
        prepare_model(model, KTConfig(freeze_experts=True))
