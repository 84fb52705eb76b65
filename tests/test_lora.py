"""Expert LoRA: PEFT's layout read as engine factors, the per-instance forward binding, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import ParamWrapper

from kt_trl import KTConfig
from kt_trl.containers import find_moe_blocks
from kt_trl.layouts import match_layout
from kt_trl.lora import bind_expert_lora, expert_lora_factors, requested_expert_lora
from kt_trl.prepare import prepare_model
from tests.helpers import VOCAB, expert_targets, tiny_model

TARGETS = expert_targets("qwen3_moe")


def expert_peft(model=None, **kwargs):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=TARGETS, init_lora_weights=False, **kwargs)
    return get_peft_model(model if model is not None else tiny_model("qwen3_moe"), config)


def blocks(peft_model):
    base = peft_model.get_base_model()
    return find_moe_blocks(base.model.layers, match_layout(base))


def logits(model, seed=0):
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_factor_views_match_peft_delta_weight():
    for block in blocks(expert_peft()):
        for wrapper in block.wrappers:
            lora = expert_lora_factors(wrapper, "default")
            delta = lora.scale * torch.einsum("eor,eri->eoi", lora.B, lora.A)  # [E, out, in], the param's layout
            torch.testing.assert_close(delta, wrapper.get_delta_weight("default"))
            # views of the parameters themselves: the optimizer's tensors get the gradients
            assert lora.A.data_ptr() == wrapper.lora_A["default"].weight.data_ptr()
            assert lora.B.data_ptr() == wrapper.lora_B["default"].weight.data_ptr()


def test_wrappers_nest_down_proj_outside_gate_up_proj():
    block = blocks(expert_peft())[0]
    assert [w.parameter_name for w in block.wrappers] == ["down_proj", "gate_up_proj"]
    assert block.slot is block.wrappers[0] and block.experts is block.wrappers[-1].base_layer


def test_binding_is_per_instance_and_idempotent():
    model = expert_peft()
    prepare_model(model)
    outer = blocks(model)[0].wrappers[0]
    bound = outer.forward
    assert bind_expert_lora(blocks(model)[0], match_layout(model.get_base_model())) is True
    assert outer.forward is bound and outer._kt_routed
    assert type(outer).forward is ParamWrapper.forward  # the class is untouched
    other = expert_peft()
    assert "forward" not in vars(blocks(other)[0].wrappers[0])  # unprepared instances keep PEFT's forward


@pytest.mark.parametrize("targets", [TARGETS, TARGETS[:1], TARGETS[1:]], ids=["both", "gate_up", "down"])
def test_engine_matches_peft_forward(targets):
    config = LoraConfig(r=4, lora_alpha=8, target_parameters=targets, init_lora_weights=False)
    plain = get_peft_model(tiny_model("qwen3_moe"), config)
    kt = copy.deepcopy(plain)
    prepare_model(kt)
    expected, got = logits(plain), logits(kt)
    assert (got - expected).abs().max() < 2e-2 * expected.abs().max()  # BF16 experts


def test_disable_adapter_runs_the_base_experts():
    model = tiny_model("qwen3_moe")
    base_kt = copy.deepcopy(model)
    prepare_model(base_kt, KTConfig(freeze_experts=True))
    kt = expert_peft(model)
    prepare_model(kt)
    with kt.disable_adapter():
        torch.testing.assert_close(logits(kt), logits(base_kt), rtol=0, atol=0)
    assert not torch.equal(logits(kt), logits(base_kt))


def test_two_active_adapters_are_refused():
    kt = expert_peft()
    kt.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_parameters=TARGETS))
    prepare_model(kt)
    kt.base_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="2 adapters .* are active"):
        logits(kt)


def test_expert_lora_moves_to_fp32_on_cpu():
    model = tiny_model("qwen3_moe").to(torch.bfloat16)
    kt = get_peft_model(model, LoraConfig(target_parameters=TARGETS), autocast_adapter_dtype=False)
    assert blocks(kt)[0].wrappers[0].lora_A["default"].weight.dtype == torch.bfloat16
    prepare_model(kt)
    for name, param in kt.named_parameters():
        if ".experts." in name and "lora_" in name:
            assert param.dtype == torch.float32 and param.device.type == "cpu", name


@pytest.mark.parametrize(
    "config, expected",
    [
        (None, False),
        (LoraConfig(target_modules=["q_proj"]), False),
        (LoraConfig(target_modules="all-linear"), True),
        (LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]), True),
        (LoraConfig(target_modules=["q_proj"], target_parameters=["block_sparse_moe.experts.down_proj"]), True),
    ],
)
def test_requested_expert_lora(config, expected):
    assert requested_expert_lora(config) is expected
