"""A micro-batch as two halves on two threads (`kt_trl.overlap`): the same training as the whole batch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kt_trl import KTConfig
from kt_trl.overlap import split_batch, use_halves
from tests.helpers import step_losses
from tests.test_trainer import assert_parity, expert_lora, train_pair


def test_split_batch_halves_every_tensor_along_the_batch():
    inputs = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2), "use_cache": False}
    first, second = split_batch(inputs)
    assert torch.equal(torch.cat([first["input_ids"], second["input_ids"]]), inputs["input_ids"])
    assert first["labels"].shape[0] == 2 and second["labels"].shape[0] == 3
    assert first["use_cache"] is False and second["use_cache"] is False


@pytest.mark.parametrize("inputs", [
    {"input_ids": torch.zeros(1, 8)},                                   # one sequence (padding-free packing)
    {"input_ids": torch.zeros(4, 8), "position_ids": torch.zeros(1, 32)},  # rows that do not line up
])
def test_split_batch_declines_what_it_cannot_halve(inputs):
    assert split_batch(inputs) is None


def fake_trainer(*, overlap=True, aux=False, processes=1, n_gpu=1):
    return SimpleNamespace(
        kt_config=KTConfig(overlap_halves=overlap), aux_loss_enabled=aux, is_deepspeed_enabled=False,
        is_fsdp_enabled=False, accelerator=SimpleNamespace(num_processes=processes), args=SimpleNamespace(n_gpu=n_gpu))


@pytest.mark.parametrize("settings, expected", [
    ({}, True),
    ({"overlap": False}, False),                  # the default
    ({"aux": True}, False),                       # the router's aux loss does not add up over halves
    ({"processes": 2}, False),
    ({"n_gpu": 2}, False),
])
def test_when_halves_apply(settings, expected):
    trainer = fake_trainer(**settings)
    assert use_halves(trainer, num_items_in_batch=torch.tensor(100)) is expected
    assert use_halves(trainer, num_items_in_batch=None) is False  # a per-half mean would not add up


@pytest.mark.parametrize("gpu_experts", ["none", 8])
def test_halves_train_as_the_whole_batch(gpu_experts, tmp_path, tokenizer, dataset):
    """Layer 0 in transformers' path (gpu_experts=8) or on the engine, layer 1 on the engine, gradient
    checkpointing and accumulation: the same losses as the whole batch, and as plain SFTTrainer."""
    runs = {}
    for overlap in (True, False):
        runs[overlap] = train_pair("qwen3_moe", tmp_path / str(overlap), tokenizer, dataset, expert_lora("qwen3_moe"),
                                   kt_config=KTConfig(gpu_experts=gpu_experts, overlap_halves=overlap),
                                   gradient_accumulation_steps=2, router_aux_loss_coef=0.0)
        assert_parity(runs[overlap])
    halves, whole = runs[True]["kt"][0], runs[False]["kt"][0]
    # the same per-token values; only the order of the gradient sums differs (observed <= 1.4e-5 after 5 steps)
    torch.testing.assert_close(torch.tensor(step_losses(halves)), torch.tensor(step_losses(whole)),
                               rtol=1e-4, atol=0.0)
    runners = [m._kt_runner for m in halves.model.modules() if hasattr(m, "_kt_runner")]
    # two engine forwards and backwards per micro-batch: 5 steps of 2 micro-batches, in halves
    assert runners and all(r.forward_calls == r.backward_calls == r.reused_forwards == 20 for r in runners)
