"""Unwrapping containers and finding layers / MoE blocks."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kt_trl.containers import find_decoder_layers, find_moe_blocks, param_wrappers, unwrap_model
from kt_trl.layouts import match_layout
from tests.helpers import expert_targets, tiny_model


class Holder(torch.nn.Module):
    """Stands in for a wrapper that keeps the model under one attribute."""

    def __init__(self, attr: str, inner: torch.nn.Module):
        super().__init__()
        setattr(self, attr, inner)


def test_unwrap_peft_ddp_compile_and_value_head():
    model = tiny_model("qwen3_moe")
    peft_model = get_peft_model(model, LoraConfig(target_modules=["o_proj"]))
    assert unwrap_model(peft_model) is model
    wrapped = Holder("module", Holder("_orig_mod", Holder("pretrained_model", peft_model)))  # DDP(compile(value-head))
    assert unwrap_model(wrapped) is model
    assert unwrap_model(model) is model


def test_unwrap_refuses_cycles():
    a = Holder("module", torch.nn.Linear(1, 1))
    object.__setattr__(a, "module", a)  # a cycle nn.Module itself would refuse to register
    with pytest.raises(ValueError, match="nested wrappers"):
        unwrap_model(a)


def test_decoder_layers_when_get_decoder_returns_the_model_itself():
    model = tiny_model("mixtral")
    model.get_decoder = lambda: model  # Llama4's quirk
    assert find_decoder_layers(model) is model.model.layers


def test_decoder_layers_missing():
    with pytest.raises(ValueError, match="Could not find the decoder layers of Linear"):
        find_decoder_layers(torch.nn.Linear(2, 2))


def test_granite_block_and_dense_layers_skipped():
    granite = tiny_model("granitemoe")
    blocks = find_moe_blocks(find_decoder_layers(granite), match_layout(granite))
    assert [b.block for b in blocks] == [layer.block_sparse_moe for layer in granite.model.layers]
    deepseek = tiny_model("deepseek_v3")
    assert [b.index for b in find_moe_blocks(find_decoder_layers(deepseek), match_layout(deepseek))] == [1, 2]


def test_param_wrappers_outer_to_inner():
    model = get_peft_model(tiny_model("qwen3_moe"), LoraConfig(target_parameters=expert_targets("qwen3_moe")))
    slot = model.get_base_model().model.layers[0].mlp.experts
    base, wrappers = param_wrappers(slot)
    assert type(base).__name__ == "Qwen3MoeExperts"
    assert [w.parameter_name for w in wrappers] == ["down_proj", "gate_up_proj"]
