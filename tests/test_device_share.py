"""Experts of a CPU-routed layer also kept on the training device (`kt_trl.device_share`): the share and
the engine together against the float64 reference, rebalancing, and the trainer's rebalance after step 1.

On this machine the "device" is the CPU: the mechanism (split of the routes, the share's torch forward
and backward, its LoRA gradients added into the engine's) is the same; the overlap needs a GPU.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import TrainerCallback

from kt_trl import KTConfig, KTSFTTrainer
from kt_trl.device_share import DeviceShare, rebalance
from kt_trl.engine import ExpertEngine, ExpertLoRA
from kt_trl.experts import EngineRunner
from kt_trl.reference import routed_experts_reference
from tests.helpers import sft_args, step_losses, tiny_model
from tests.test_trainer import expert_lora

E, H, I, T, K = 8, 64, 32, 48, 2
BF16_REL = 0.02  # rel-L2 of BF16 inputs and products with FP32 sums against float64, as the engine's tests


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def experts(seed=0, bias=False):
    generator = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(E, 2 * I, H, generator=generator) / 8).bfloat16()
    down = (torch.randn(E, H, I, generator=generator) / 6).bfloat16()
    biases = (torch.randn(E, 2 * I, generator=generator) / 4, torch.randn(E, H, generator=generator) / 4) if bias else None
    return gate_up, down, biases


def call(engine, share_ids, r, *, ids=None, seed=1, device="cpu"):
    """y and the gradients of x, w and the LoRA factors through an `EngineRunner` (with a share of
    `share_ids` on `device`, where x, ids and w live, or none), and the inputs."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=generator).to(device).requires_grad_()
    ids = (torch.rand(T, E, generator=generator).argsort(1)[:, :K] if ids is None else ids).to(device)
    w = torch.rand(T, K, generator=generator).to(device).requires_grad_()
    factors = [(torch.randn(*shape, generator=generator) / 8).requires_grad_()
               for shape in ((E, r, H), (E, 2 * I, r), (E, r, I), (E, H, r))] if r else []
    runner = EngineRunner(engine)
    if share_ids is not None:
        runner.share = DeviceShare(engine, share_ids, device)
    loras = dict(lora_gate_up=ExpertLoRA(factors[0], factors[1], 0.5), lora_down=ExpertLoRA(factors[2], factors[3], 0.5)) if r else {}
    y = runner(x, ids, w, **loras)
    dy = torch.randn(y.shape, generator=generator)
    (y * dy).sum().backward()
    return y.detach(), [t.grad for t in (x, w, *factors)], (x, ids, w, factors, dy), runner


def reference(gate_up, down, inputs, biases=None, **activation):
    x, ids, w, factors, dy = (t.cpu() if isinstance(t, torch.Tensor) else t for t in inputs)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, *factors)]
    lora = dict(lora_gate_up=(leaves[2], leaves[3], 0.5), lora_down=(leaves[4], leaves[5], 0.5)) if factors else {}
    bias = dict(gate_up_bias=biases[0], down_bias=biases[1]) if biases else {}
    y = routed_experts_reference(leaves[0], ids, leaves[1], gate_up, down, **lora, **bias, **activation)
    (y * dy.cpu().double()).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("share_ids", [[1, 5, 6], list(range(E)), [3]], ids=["three", "all", "one"])
@pytest.mark.parametrize("r", [0, 4, 8], ids=["no lora", "r4 (one GEMM per expert)", "r8 (grouped GEMMs)"])
def test_share_and_engine_together_compute_the_reference(share_ids, r):
    gate_up, down, _ = experts()
    engine = ExpertEngine(gate_up, down)
    y, grads, inputs, runner = call(engine, share_ids, r)
    y_ref, grads_ref = reference(gate_up, down, inputs)
    assert rel(y, y_ref) < BF16_REL
    for name, grad, expected in zip(("x", "w", "A_gu", "B_gu", "A_d", "B_d"), grads, grads_ref):
        assert rel(grad, expected) < BF16_REL, name
    # and the same as the engine alone, to BF16 rounding
    y_engine, grads_engine, _, _ = call(engine, None, r)
    assert rel(y, y_engine) < BF16_REL and all(rel(a, b) < BF16_REL for a, b in zip(grads, grads_engine))
    assert runner.share.counts[:-1].sum() == T * K  # the routes are counted, once per forward


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on a CUDA machine)")
def test_a_share_on_the_gpu_computes_the_reference():
    gate_up, down, _ = experts()
    engine = ExpertEngine(gate_up, down)
    y, grads, inputs, runner = call(engine, [0, 3, 4, 7], 8, device="cuda")  # r 8: grouped GEMMs on the GPU
    assert y.is_cuda and runner.share.gate_up.is_cuda and grads[0].is_cuda and grads[2].device.type == "cpu"
    y_ref, grads_ref = reference(gate_up, down, inputs)
    assert rel(y.cpu(), y_ref) < BF16_REL
    for name, grad, expected in zip(("x", "w", "A_gu", "B_gu", "A_d", "B_d"), grads, grads_ref):
        assert rel(grad.cpu(), expected) < BF16_REL, name


def test_routes_that_miss_the_share_leave_it_out():
    gate_up, down, _ = experts()
    engine = ExpertEngine(gate_up, down)
    first = torch.arange(T) % 6  # experts 0..5 only
    y, grads, inputs, runner = call(engine, [6, 7], 4, ids=torch.stack([first, (first + 1) % 6], 1))
    y_ref, grads_ref = reference(gate_up, down, inputs)
    assert rel(y, y_ref) < BF16_REL and all(rel(a, b) < BF16_REL for a, b in zip(grads, grads_ref))
    assert runner.share.forward(inputs[0], inputs[1], inputs[2], (0.5, 0.5), [None] * 4) is None


def test_biased_clamped_swiglu_experts_share_like_the_engine():
    gate_up, down, biases = experts(bias=True)
    activation = dict(activation="clamped_swiglu", alpha=1.702, limit=7.0)
    engine = ExpertEngine(gate_up, down, gate_up_bias=biases[0], down_bias=biases[1], **activation)
    y, grads, inputs, _ = call(engine, [0, 2, 4, 6], 0)
    y_ref, grads_ref = reference(gate_up, down, inputs, biases, **activation)
    assert rel(y, y_ref) < BF16_REL and all(rel(a, b) < BF16_REL for a, b in zip(grads, grads_ref))


def test_rebalance_holds_the_most_routed_experts_and_keeps_the_outputs():
    gate_up, down, _ = experts()
    engine = ExpertEngine(gate_up, down)
    skewed = torch.stack([torch.arange(T) % 3 + 5, torch.arange(T) % 2], 1)  # experts 5, 6, 7 and 0, 1 only
    y_before, _, (x, _, w, _, _), runner = call(engine, [0, 2, 3], 0, ids=skewed)
    share = runner.share
    copied, before, after, routes = share.rebalance()
    top = set(torch.topk(share.counts[:-1], 3).indices.tolist())
    assert set(share.experts.tolist()) == top and copied == len(top - {0, 2, 3})
    assert (before, routes) == (T // 2, T * K) and after > before
    for slot, e in enumerate(share.experts.tolist()):  # each slot holds its expert's weights
        torch.testing.assert_close(share.gate_up[slot], gate_up[e], rtol=0, atol=0)
        torch.testing.assert_close(share.down[slot], down[e], rtol=0, atol=0)
    assert rel(runner(x, skewed, w).detach(), y_before) < BF16_REL
    assert share.rebalance()[0] == 0  # already the top experts: nothing copied


def test_a_share_refuses_bad_expert_ids():
    engine = ExpertEngine(*experts()[:2])
    with pytest.raises(ValueError, match="1..8 experts"):
        DeviceShare(engine, [], "cpu")
    share = DeviceShare(engine, [0, 1], "cpu")
    for bad, message in (([0, 0], "distinct"), ([0, 8], r"in \[0, 8\)"), ([0], "give 2")):
        with pytest.raises(ValueError, match=message):
            share.load(bad)


class _HeldAfterStepOne(TrainerCallback):
    """Records the shares' experts and the counted routes once the first step's callbacks ran."""

    def __init__(self):
        self.held = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            shares = [m._kt_runner.share for m in model.modules() if getattr(getattr(m, "_kt_runner", None), "share", None)]
            self.held = [(set(s.experts.tolist()), set(torch.topk(s.counts[:-1], s.size).indices.tolist()),
                          s.counts[:-1].clone()) for s in shares]


def test_the_trainer_moves_the_most_routed_experts_to_the_device_after_step_one(tmp_path, tokenizer, dataset, caplog):
    trainer = KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(tmp_path, max_steps=2), train_dataset=dataset,
                           processing_class=copy.deepcopy(tokenizer), peft_config=expert_lora("qwen3_moe"),
                           kt_config=KTConfig(gpu_experts=6))
    probe = _HeldAfterStepOne()
    trainer.add_callback(probe)
    with caplog.at_level(logging.INFO, logger="kt_trl.device_share"):
        trainer.train()
    assert trainer.kt_report.experts_shared_per_layer == 3 and len(probe.held) == 2
    for held, top, counts in probe.held:
        assert counts.sum() > 0 and sorted(counts[list(held)].tolist()) == sorted(counts[list(top)].tolist())
    assert caplog.text.count("most-routed experts") == 1
    assert len(step_losses(trainer)) == 2


def test_rebalance_between_a_forward_and_its_backward_is_refused():
    model = torch.nn.Module()
    engine = ExpertEngine(*experts()[:2])
    model.experts = torch.nn.Module()
    model.experts._kt_runner = runner = EngineRunner(engine)
    runner.share = DeviceShare(engine, [0], "cpu")
    runner.pending = ["a first forward waiting for its recomputation"]
    with pytest.raises(RuntimeError, match="between steps"):
        rebalance(model)
