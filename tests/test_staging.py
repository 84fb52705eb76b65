"""HostStaging: pass-through on the CPU, pinned non-blocking copies ordered by events on CUDA.

The CPU tests cover the bookkeeping (which pinned sources stay alive, what waits on what) with
stand-in events, and check that a CPU-only run never reaches CUDA. The GPU tests (`gpu` marker,
skipped without CUDA) check that the CUDA path gives exactly the synchronous path's values and
never synchronizes the device or a stream.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from kt_trl import staging as staging_mod
from kt_trl.config import KTConfig
from kt_trl.engine import ExpertEngine, ExpertLoRA
from kt_trl.experts import EngineRunner, expert_counters
from kt_trl.prepare import prepare_model
from kt_trl.staging import HostStaging, InFlightCopies
from tests.native.moe_case import make_case
from tests.helpers import GRAD_RTOL, batch, expert_targets, tiny_model



def on_gpu(test):
    """The `gpu` marker, skipped without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on a CUDA machine)")
    return pytest.mark.gpu(skip(test))


class FakeEvent:
    """Stands in for torch.cuda.Event: done when told, 2 ms of device time."""

    def __init__(self, log: list, name: str):
        self.log, self.name, self.done = log, name, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append(f"wait {self.name}")
        self.done = True

    def elapsed_time(self, end) -> float:
        return 2.0


def copies(log, flight, n):
    events = [FakeEvent(log, f"copy{i}") for i in range(n)]
    for event in events:
        flight.add(event, FakeEvent(log, "start"), torch.empty(4))
    return events


def test_pinned_sources_live_until_their_copies_complete():
    log: list = []
    flight = InFlightCopies(max_in_flight=8)
    events = copies(log, flight, 3)
    assert len(flight) == 3 and flight.release_finished() == 0.0
    events[1].done = True  # completed out of order: copy0 still holds its source, and so does copy1
    assert flight.release_finished() == 0.0 and len(flight) == 3
    events[0].done = True
    assert flight.release_finished() == pytest.approx(0.004) and len(flight) == 1
    assert log == []  # nobody waited


def test_in_flight_copies_are_bounded_by_waiting_on_the_oldest_event_only():
    log: list = []
    flight = InFlightCopies(max_in_flight=2)
    copies(log, flight, 4)
    assert log == ["wait copy0", "wait copy1"] and len(flight) == 2
    with pytest.raises(ValueError, match="max_in_flight must be >= 1"):
        InFlightCopies(max_in_flight=0)


def test_cpu_tensors_pass_through_without_pinned_memory(monkeypatch):
    empty = torch.empty

    def no_pinning(*args, **kwargs):
        assert not kwargs.get("pin_memory"), "pinned memory requested on the CPU path"
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinning)
    monkeypatch.setattr(staging_mod, "_timing_event", lambda: pytest.fail("a CUDA event on the CPU path"))
    staging = HostStaging()
    x = torch.randn(6, 4).t()  # non-contiguous
    ids = torch.randint(0, 8, (4, 2))
    x_cpu, ids_cpu = staging.to_host(x, ids)
    assert x_cpu.is_contiguous() and torch.equal(x_cpu, x) and ids_cpu is ids
    y = staging.to_device(torch.ones(3, 2, dtype=torch.bfloat16), device="cpu", dtype=torch.float32)
    assert y.dtype == torch.float32 and torch.equal(y, torch.ones(3, 2))
    assert all(value == 0 for value in staging.stats.as_dict().values())


def peft_model(family="qwen3_moe"):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets(family),
                        init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(tiny_model(family), config)


def test_cpu_training_step_never_reaches_cuda(monkeypatch):
    model = peft_model()
    prepare_model(model)
    runners = [m._kt_runner for m in model.modules() if hasattr(m, "_kt_runner")]
    assert len({id(r.staging) for r in runners}) == 1  # one staging serves every layer
    monkeypatch.setattr(staging_mod, "_timing_event", lambda: pytest.fail("a CUDA event on the CPU path"))
    model.gradient_checkpointing_enable()
    model.train()
    model(**batch()).loss.backward()
    counters = expert_counters(model)
    assert counters["forward_calls"] == counters["backward_calls"] == len(runners)
    assert counters["to_host_calls"] == counters["to_device_calls"] == 0


# ---- CUDA path ----------------------------------------------------------------------------------------


def expert_call(runner, case, device):
    """Forward + backward of one EngineRunner call with inputs on `device`; outputs and gradients on the CPU."""
    def leaf(t, where="cpu"):
        return t.detach().clone().to(where).requires_grad_()

    leaves = {
        "x": leaf(case.x, device), "w": leaf(case.w, device),
        "A_gu": leaf(case.lora_gate_up[0]), "B_gu": leaf(case.lora_gate_up[1]),  # expert LoRA stays on the CPU
        "A_d": leaf(case.lora_down[0]), "B_d": leaf(case.lora_down[1]),
    }
    E = case.dims[0]
    lora_gate_up = ExpertLoRA(leaves["A_gu"], leaves["B_gu"].view(-1, 4, E).permute(2, 0, 1), case.lora_gate_up[2])
    lora_down = ExpertLoRA(leaves["A_d"], leaves["B_d"], case.lora_down[2])
    y = runner(leaves["x"], case.ids.to(device), leaves["w"], lora_gate_up=lora_gate_up, lora_down=lora_down)
    y.backward(case.dy.to(device))
    return y, leaves


def cpu_values(y, leaves):
    return {"y": y.detach().cpu(), **{name: leaf.grad.cpu() for name, leaf in leaves.items()}}


def make_runner(case):
    engine = ExpertEngine(case.gate_up, case.down)
    return EngineRunner(engine, layer=torch.nn.Linear(1, 1), name="test", config=KTConfig())


@on_gpu
@pytest.mark.parametrize("tokens", [1, 37, 300])
def test_cuda_path_matches_the_synchronous_path(tokens):
    case = make_case(8, 64, 32, tokens, 2, rank_gate_up=4, rank_down=4, seed=tokens)
    runner = make_runner(case)
    expected = cpu_values(*expert_call(runner, case, "cpu"))
    y, leaves = expert_call(runner, case, "cuda")
    assert y.device.type == "cuda" and leaves["x"].grad.device.type == "cuda"
    got = cpu_values(y, leaves)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0, msg=name)  # the same engine, the same inputs


@on_gpu
def test_cuda_path_never_synchronizes(monkeypatch):
    case = make_case(8, 64, 32, 50, 2, rank_gate_up=4, rank_down=4)
    runner = make_runner(case)
    case.x, case.w, case.ids, case.dy = (t.cuda() for t in (case.x, case.w, case.ids, case.dy))  # copies before
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("torch.cuda.synchronize() called"))
    torch.cuda.set_sync_debug_mode("error")  # also raises on stream syncs and synchronous copies
    try:
        y, leaves = expert_call(runner, case, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = runner.staging.stats
    assert (stats.to_host_calls, stats.to_device_calls) == (2, 3)  # x/ids/w and dy down; y, dx, dw up
    assert stats.to_host_bytes == 50 * 64 * 2 + 50 * 2 * (8 + 4) + 50 * 64 * 2
    assert stats.to_device_bytes == 50 * 64 * 2 + 50 * 64 * 2 + 50 * 2 * 4
    assert stats.pin_copy_seconds == 0  # the engine wrote y, dx and dw into pinned memory itself
    torch.cuda.current_stream().synchronize()
    runner.staging.release_finished()
    assert len(runner.staging.in_flight) == 0


@on_gpu
def test_staged_host_tensors_are_pinned():
    staging = HostStaging()
    x = torch.randn(5, 8, device="cuda").t()
    (x_cpu,) = staging.to_host(x)
    assert x_cpu.is_pinned() and x_cpu.is_contiguous() and torch.equal(x_cpu, x.cpu())


@on_gpu
@pytest.mark.parametrize("gpu_gb", [None, 0.0], ids=["kept-on-gpu", "kept-on-host"])
def test_checkpointed_model_step_on_cuda_matches_cpu(monkeypatch, gpu_gb):
    plain = peft_model()
    kt = copy.deepcopy(plain)
    prepare_model(kt, KTConfig(max_kept_activations_gpu_gb=gpu_gb, gpu_experts="none"))
    kt.cuda()
    for model in (plain, kt):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        model.train()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: pytest.fail("torch.cuda.synchronize() called"))
    inputs = batch()
    plain(**inputs).loss.backward()
    kt(**{k: v.cuda() for k, v in inputs.items()}).loss.backward()
    counters = expert_counters(kt)
    assert counters["reused_forwards"] == counters["backward_calls"] == 2  # one per layer, no recompute
    kept_on_gpu = gpu_gb is None  # the default budget: a quarter of the device
    assert (counters["kept_activation_device_peak_bytes"] > 0) == kept_on_gpu
    assert (counters["kept_activation_peak_bytes"] > 0) != kept_on_gpu
    assert counters["kept_activation_bytes"] == counters["kept_activation_device_bytes"] == 0
    assert counters["to_host_calls"] > 0 and counters["to_device_calls"] > 0
    kt_params = dict(kt.named_parameters())
    for name, param in plain.named_parameters():
        if param.requires_grad:
            grad = kt_params[name].grad.cpu()
            error = ((grad - param.grad).norm() / param.grad.norm()).item()
            assert error < GRAD_RTOL, f"{name}: gradient relative error {error:.4f}"
