"""`benchmarks/train_step.py` end to end at a tiny shape (on the CPU, or on a CUDA machine)."""

from __future__ import annotations

import math

import pytest

from tests.helpers import benchmark_module

TINY = ["--layers", "2", "--hidden", "64", "--experts", "8", "--intermediate", "32", "--vocab", "512", "--seq", "64",
        "--batch", "2", "--steps", "2", "--gpu-experts", "none"]


@pytest.fixture(scope="module")
def train_step():
    return benchmark_module("train_step")


def test_tiny_run_reports_every_step_and_matches_plain_peft(train_step, tmp_path):
    records = train_step.main([*TINY, "--reference", "--json", str(tmp_path / "records.jsonl")])
    kinds = [r["kind"] for r in records]
    assert kinds == ["runtime", *["reference_step"] * 2, "model", *["step"] * 2, "summary", "parity"]
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == len(records)
    steps = [r for r in records if r["kind"] == "step"]
    assert [r["warmup"] for r in steps] == [True, False]
    for step in steps:
        assert step["expert_calls"] == [2, 2, 2]  # 2 layers; the checkpointed recomputation reuses the forward
        parts = ("cpu_expert_forward_s", "cpu_expert_backward_s", "transfer_s", "gpu_wait_s", "optimizer_s", "rest_s")
        assert sum(step[p] for p in parts) == pytest.approx(step["step_s"], abs=1e-3)
        assert step["cpu_expert_forward_s"] > 0 and step["cpu_roofline_tokens_per_s"] > step["tokens_per_s"] > 0
        assert step["cpu_state_gb"] > 0 and step["kept_forwards_declined"] == 0
        assert step["minor_faults"] >= 0
        threads = step["busy_threads"]  # [name, tid, CPU seconds, share of the step], then the others summed
        assert threads[-1][0] == "others" and all(row[2] >= 0 for row in threads)
        assert [row[2] for row in threads[:-1]] == sorted((row[2] for row in threads[:-1]), reverse=True)
    summary = records[kinds.index("summary")]
    assert summary["steps"] == 1 and summary["packed_bytes"] > 0 and summary["expert_lora_parameters"] > 0
    assert abs(summary["losses"][0] - math.log(512)) < 0.3  # random init: about uniform over the vocabulary
    assert summary["kept_activations_host_peak_gb"] + summary["kept_activations_gpu_peak_gb"] > 0
    parity = records[-1]
    assert parity["max_loss_rel_diff"] < 1e-3 and parity["reference_tokens_per_s"] > 0


def test_busy_threads_ranks_threads_and_sums_the_rest(train_step):
    import os

    main = os.getpid()
    before = {main: ("python", 1.0), 11: ("kt_engine_1", 2.0), 12: ("kt_engine_2", 0.5), 13: ("pt_autograd", 0.0)}
    after = {main: ("python", 3.0), 11: ("kt_engine_1", 3.5), 12: ("kt_engine_2", 1.5), 13: ("pt_autograd", 0.25),
             14: ("new", 0.5)}  # a thread started during the step counts from 0
    rows = train_step.busy_threads(before, after, step_s=4.0, top=3)
    assert rows == [["main python", main, 2.0, 0.5], ["kt_engine_1", 11, 1.5, 0.38], ["kt_engine_2", 12, 1.0, 0.25],
                    ["others", 2, 0.75, 0.19]]
    assert train_step.thread_cpu_seconds()[main][1] > 0  # this process's own main thread, from /proc


def test_zero_activation_budget_recomputes_every_layer(train_step):
    records = train_step.main([*TINY, "--max-kept-activations-gb", "0", "--max-kept-activations-gpu-gb", "0"])
    steps = [r for r in records if r["kind"] == "step"]
    assert all(r["expert_calls"] == [4, 0, 2] and r["kept_forwards_declined"] == 2 for r in steps)
    assert records[-1]["kept_activations_host_peak_gb"] == records[-1]["kept_activations_gpu_peak_gb"] == 0


def test_built_model_never_holds_dense_experts(train_step):
    import torch

    opts = train_step.parse(TINY)
    model = train_step.build_model(train_step.model_config(opts), device=torch.device("cpu"), seed=0, engines=True)
    for layer in model.model.layers:
        experts = layer.mlp.experts
        assert experts.gate_up_proj.stride() == (0, 0, 0) and experts.down_proj.stride() == (0, 0, 0)
        assert experts._kt_engine.dims == (8, 64, 32)
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())


def test_layers_kept_dense_train_like_plain_peft(train_step):
    records = train_step.main([*TINY[:-2], "--gpu-experts", "8", "--reference"])  # one layer of 8 experts
    summary = next(r for r in records if r["kind"] == "summary")
    assert summary["gpu_layers"] == [0]
    assert all(r["expert_calls"] == [1, 1, 1] for r in records if r["kind"] == "step")  # layer 1 only
    parity = next(r for r in records if r["kind"] == "parity")
    assert parity["max_loss_rel_diff"] < 5e-3
