"""The engine-backed experts path: single-step gradients, gradient-checkpointing reuse, placement."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kt_trl.config import KTConfig
from kt_trl.experts import expert_counters, kt_experts_forward
from kt_trl.prepare import prepare_model
from tests.helpers import GRAD_RTOL, batch, expert_targets, peft_pair, runners, tiny_model

@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "granitemoe"])
def test_single_step_gradients_match_fp32(family):
    plain, kt = peft_pair(family)
    inputs = batch()
    losses = []
    for model in (plain, kt):
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-3, atol=0.0)
    checked = assert_grads_close(plain, kt)
    assert sum(".experts." in name for name in checked) == 4 * len(runners(kt))  # A, B of gate_up and down


def assert_grads_close(plain, kt) -> list[str]:
    """Every trainable parameter's gradient within GRAD_RTOL (relative norm); returns the names."""
    kt_params = dict(kt.named_parameters())
    names = []
    for name, param in plain.named_parameters():
        if not param.requires_grad:
            continue
        grad, reference = kt_params[name].grad, param.grad
        assert grad is not None, f"{name} got no gradient"
        error = ((grad - reference).norm() / reference.norm()).item()
        assert error < GRAD_RTOL, f"{name}: gradient relative error {error:.4f}"
        names.append(name)
    return names


def _train_step(model, inputs):
    model(**inputs).loss.backward()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointing_reuses_first_forward(reentrant):
    plain, kt = peft_pair("qwen3_moe", router=False)
    kt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    kt.enable_input_require_grads()
    kt.train()
    for step in range(2):
        _train_step(kt, batch(step))
    for runner in runners(kt):
        assert (runner.forward_calls, runner.reused_forwards, runner.backward_calls) == (2, 2, 2)
        assert not runner.pending
    # gradients equal those of the model without checkpointing
    plain.train()
    for step in range(2):
        _train_step(plain, batch(step))
    assert_grads_close(plain, kt)


def test_checkpointing_recompute_switch():
    kt = get_peft_model(tiny_model("qwen3_moe"), LoraConfig(target_parameters=expert_targets("qwen3_moe")))
    prepare_model(kt, KTConfig(reuse_checkpointed_activations=False))
    kt.gradient_checkpointing_enable()
    kt.train()
    _train_step(kt, batch())
    assert all((r.forward_calls, r.reused_forwards) == (2, 0) for r in runners(kt))


def test_kept_activations_budget_recomputes_the_layers_beyond_it():
    """The model-wide budget keeps the first layers' forwards; later layers recompute; gradients agree."""
    _, unlimited = peft_pair("qwen3_moe", router=False)
    unlimited.gradient_checkpointing_enable()
    unlimited.train()
    unlimited(**batch())  # first forwards only: every layer keeps its activations
    per_layer = expert_counters(unlimited)["kept_activation_peak_bytes"] // len(runners(unlimited))
    assert per_layer > 0

    one_layer = KTConfig(max_kept_activations_gb=1.5 * per_layer / 1e9)
    plain, kt = peft_pair("qwen3_moe", router=False, kt_config=one_layer)
    kt.gradient_checkpointing_enable()
    kt.train()
    _train_step(kt, batch())
    first, *rest = runners(kt)
    assert (first.forward_calls, first.reused_forwards) == (1, 1)
    assert rest and all((r.forward_calls, r.reused_forwards) == (2, 0) for r in rest)
    counters = expert_counters(kt)
    assert counters["kept_activation_declined"] == len(rest)
    assert counters["kept_activation_peak_bytes"] == per_layer and counters["kept_activation_bytes"] == 0
    plain.train()
    _train_step(plain, batch())
    assert_grads_close(plain, kt)


def test_no_kept_activations_outside_training():
    _, kt = peft_pair("qwen3_moe", router=False)
    kt.gradient_checkpointing_enable()
    kt.eval()
    kt(**batch())
    kt.train()
    with torch.no_grad():
        kt(**batch())
    assert all(not r.pending and r.forward_calls == 2 for r in runners(kt))


def test_pending_activations_are_bounded(caplog):
    kt = get_peft_model(tiny_model("qwen3_moe"), LoraConfig(target_parameters=expert_targets("qwen3_moe")))
    prepare_model(kt, KTConfig(max_pending_activations=2))
    kt.gradient_checkpointing_enable()
    kt.train()
    with caplog.at_level(logging.WARNING, logger="kt_trl.experts"):
        for step in range(3):
            kt(**batch(step))
    assert all(len(r.pending) == 2 for r in runners(kt))
    assert "max_pending_activations" in caplog.text


def test_unprepared_experts_module_refuses():
    experts = tiny_model("qwen3_moe").model.layers[0].mlp.experts
    with pytest.raises(RuntimeError, match="not prepared by kt_trl"):
        kt_experts_forward(experts, torch.zeros(3, 32), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2))


def test_forward_without_backward_saves_nothing(monkeypatch):
    _, kt = peft_pair("qwen3_moe", router=False)
    saves = []
    for runner in runners(kt):
        forward = runner.engine.forward
        monkeypatch.setattr(runner.engine, "forward", lambda *a, _f=forward, **k: saves.append(k["save"]) or _f(*a, **k))
    kt.eval()
    with torch.no_grad():
        kt(**batch())
    kt.train()
    kt(**batch())
    assert saves == [False, False, True, True]


def engine_of(experts):
    """An engine built expert by expert from a module's own weights (as a checkpoint loader would)."""
    from kt_trl.engine import ExpertEngine

    num_experts, two_inter, hidden = experts.gate_up_proj.shape
    pairs = ((experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()) for e in range(num_experts))
    return ExpertEngine.from_experts(num_experts, hidden, two_inter // 2, pairs)


def test_installed_engines_are_routed_without_packing(monkeypatch):
    from kt_trl import prepare as prepare_mod
    from kt_trl import weights as weights_mod

    packed = tiny_model("qwen3_moe")
    installed = copy.deepcopy(packed)
    for layer in installed.model.layers:
        weights_mod.install_engine(layer.mlp.experts, engine_of(layer.mlp.experts))
        assert layer.mlp.experts.gate_up_proj.stride() == (0, 0, 0)  # released at once
    installed.to("meta")  # stands in for .to_empty(device="cuda"): the experts stay on the CPU
    installed.to_empty(device="cpu")
    installed.load_state_dict({k: v for k, v in packed.state_dict().items() if ".experts." not in k}, strict=False)
    for buffer, value in zip(installed.buffers(), packed.buffers()):  # rotary inv_freq is not in the state dict
        buffer.copy_(value)
    prepare_model(packed, KTConfig(freeze_experts=True))
    monkeypatch.setattr(prepare_mod, "pack_experts", lambda *args: pytest.fail("an installed engine was repacked"))
    report = prepare_model(installed, KTConfig(freeze_experts=True))
    assert report.layers_routed == (0, 1) and not hasattr(installed.model.layers[0].mlp.experts, "_kt_engine")
    inputs = batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(installed(inputs).logits, packed(inputs).logits, rtol=0, atol=0)


def test_install_engine_refuses_mismatches():
    from kt_trl.weights import install_engine

    model = tiny_model("qwen3_moe")
    layers = model.model.layers
    four_experts = tiny_model("qwen3_moe", num_experts=4).model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"engine holds \(E, H, I\) = \(8, 32, 16\).*from_experts\(4, 32, 16"):
        install_engine(four_experts, engine_of(layers[0].mlp.experts))
    prepare_model(model, KTConfig(freeze_experts=True))
    with pytest.raises(ValueError, match="before PEFT wrapping and preparation.*already prepared"):
        install_engine(layers[0].mlp.experts, engine_of(tiny_model("qwen3_moe").model.layers[0].mlp.experts))


def test_non_finite_hidden_states_are_reported_with_the_layer_and_the_cause():
    plain, kt = peft_pair("qwen3_moe")
    inputs = batch()
    embeddings = kt.get_base_model().model.embed_tokens
    with torch.no_grad():
        embeddings.weight[inputs["input_ids"][0, 3]] = float("nan")  # one poisoned token
    with pytest.raises(ValueError, match=r"layers\.0\.\w+\.experts: .*not finite.*earlier layer or the input"):
        kt(**inputs)
