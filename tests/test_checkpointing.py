"""Where kept checkpoint activations wait: accelerator budget, then host budget, then nowhere."""

from __future__ import annotations

import logging

import torch

from kt_trl.engine import ExpertActivations
from kt_trl.checkpointing import ActivationBudget, DeviceActivationBudget, KeptForwards


CUDA = torch.device("cuda", 0)  # only named: the recording staging moves nothing


def layer_output():
    return torch.zeros(3, 4, dtype=torch.bfloat16)  # 24 bytes, kept in host memory


class RecordingStaging:
    """`to_device` / `to_host` that record the calls and move nothing (or run out of memory)."""

    def __init__(self, out_of_memory: bool = False):
        self.out_of_memory = out_of_memory
        self.to_device_calls = self.to_host_calls = 0

    def to_device(self, tensor, *, device, dtype):
        self.to_device_calls += 1
        if self.out_of_memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return tensor.clone()

    def to_host(self, *tensors):
        self.to_host_calls += 1
        return tuple(t.clone() for t in tensors)


def saved_activations():
    return ExpertActivations(torch.ones(6, 8, dtype=torch.bfloat16), torch.ones(6, 2), None)  # 96 + 48 bytes


def queue(staging, *, device_gb=None, host_gb=None):
    host = ActivationBudget(None if host_gb is None else int(host_gb * 1e9))
    device = DeviceActivationBudget(int(1e9) if device_gb is None else int(device_gb * 1e9))
    return KeptForwards("layer", max_pending=4, budget=host, device_budget=device, staging=staging)


def test_accelerator_first_and_back_to_host_on_recomputation():
    staging = RecordingStaging()
    kept = queue(staging)
    ids = torch.arange(6).view(3, 2)
    assert kept.keep(ids, layer_output(), saved_activations(), CUDA)
    assert kept.device_budget.bytes == 144 and staging.to_device_calls == 2
    assert kept.budget.bytes == 48 + 24  # the ids and the layer's output stay in host memory
    entry = kept.take(ids)
    assert staging.to_host_calls == 1 and entry.saved.lora_down is None
    assert torch.equal(entry.saved.gate_up, saved_activations().gate_up)
    assert kept.device_budget.bytes == 0 and kept.device_budget.peak_bytes == 144 and kept.budget.bytes == 0


def test_out_of_accelerator_memory_falls_back_to_host(caplog):
    kept = queue(RecordingStaging(out_of_memory=True))
    with caplog.at_level(logging.WARNING, logger="kt_trl.checkpointing"):
        assert kept.keep(torch.zeros(3, 2, dtype=torch.long), layer_output(), saved_activations(), CUDA)
    assert kept.device_budget.bytes == 0 and kept.device_budget.declined == 1
    assert kept.budget.bytes == 144 + 48 + 24  # the activations, the ids and the output, in host memory
    assert "max_kept_activations_gpu_gb" in caplog.text


def test_full_budgets_keep_nothing():
    kept = queue(RecordingStaging(), device_gb=100e-9, host_gb=100e-9)  # 100 bytes each: too small
    assert not kept.keep(torch.zeros(3, 2, dtype=torch.long), layer_output(), saved_activations(), CUDA)
    assert len(kept) == 0 and kept.budget.declined == 1 and kept.device_budget.declined == 1
    assert kept.budget.bytes == kept.device_budget.bytes == 0


def test_checkpointing_is_read_under_either_name_of_the_training_arguments():
    from types import SimpleNamespace

    from kt_trl.checkpointing import checkpointing_requested

    # transformers 5.25 renamed the argument (the old name an alias until v6); older releases have only the old one
    assert checkpointing_requested(SimpleNamespace(activation_checkpointing=True)) is True
    assert checkpointing_requested(SimpleNamespace(gradient_checkpointing=True)) is True
    assert checkpointing_requested(SimpleNamespace(activation_checkpointing=False, gradient_checkpointing=True)) is False
    assert checkpointing_requested(SimpleNamespace()) is None and checkpointing_requested(None) is None
