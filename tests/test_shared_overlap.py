"""Shared experts computed while the engine runs: the same results, the stash used only when it fits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kt_trl.config import KTConfig
from kt_trl.shared_overlap import SharedExpertsAhead
from tests.test_experts import batch, peft_pair, runners


def shared_modules(model):
    return [r.shared_ahead for r in runners(model)]


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2", "glm4_moe"])
@pytest.mark.parametrize("checkpointing", [None, False, True], ids=["plain", "non-reentrant", "reentrant"])
def test_overlapped_shared_experts_give_the_same_gradients(family, checkpointing):
    _, overlapped = peft_pair(family, kt_config=KTConfig(overlap_shared_experts=True))
    _, sequential = peft_pair(family)  # the default does not overlap
    losses = []
    for model in (overlapped, sequential):
        if checkpointing is not None:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
            model.enable_input_require_grads()
        model.train()
        loss = model(**batch()).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    grads = dict(sequential.named_parameters())
    for name, param in overlapped.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.grad, grads[name].grad), name
    # The first forward takes the result computed ahead; a reentrant recomputation runs the block again
    # and takes it too, a non-reentrant one stops once the saved tensors are back (before the call).
    forwards = 2 if checkpointing is True else 1
    assert [a.hits for a in shared_modules(overlapped)] == [forwards] * len(runners(overlapped))
    assert all(a._stash is None for a in shared_modules(overlapped))  # nothing left holding a graph
    assert all(a is None for a in shared_modules(sequential))


def test_families_calling_shared_experts_first_are_left_alone():
    _, model = peft_pair("qwen2_moe", router=False, kt_config=KTConfig(overlap_shared_experts=True))
    assert all(r.shared_ahead is None for r in runners(model))


def test_overlap_off_leaves_the_module_untouched():
    _, model = peft_pair("deepseek_v3")
    assert all(r.shared_ahead is None for r in runners(model))
    assert all("forward" not in vars(m.mlp.shared_experts) for m in model.base_model.model.model.layers
               if hasattr(m.mlp, "shared_experts"))


def test_stash_is_used_only_for_the_same_hidden_states():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
    ahead = SharedExpertsAhead(mlp)
    x = torch.randn(2, 3, 8)
    flat = x.view(-1, 8)
    ahead.compute(flat, grad_enabled=False)
    torch.testing.assert_close(mlp(x), ahead._forward(x))  # same hidden states, another shape: the stash
    assert ahead.hits == 1
    ahead.compute(flat, grad_enabled=False)
    other = torch.randn(2, 3, 8)
    torch.testing.assert_close(mlp(other), ahead._forward(other))  # other values: computed afresh
    ahead.compute(flat, grad_enabled=False)
    x.mul_(2)  # changed in place since: computed afresh
    torch.testing.assert_close(mlp(x), ahead._forward(x))
    assert ahead.hits == 1


def test_modules_with_hooks_are_not_computed_ahead():
    mlp = nn.Linear(4, 4)
    ahead = SharedExpertsAhead(mlp)
    assert ahead.usable
    mlp.register_forward_hook(lambda *args: None)
    assert not ahead.usable
