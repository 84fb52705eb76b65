"""Routing one layer's fused experts through the CPU engine.

`EngineRunner` runs one layer's packed experts (an `ExpertEngine`) through
`autograd.RoutedExpertsFunction`, the `torch.autograd.Function` over the engine's forward and
backward (reached through `autograd.ToHost` / `ToDevice` from a CUDA device), with
gradient-checkpointing reuse (`kt_trl.checkpointing`) and counters. It hangs off the
Hugging Face experts module as `_kt_runner`; transformers reaches it through the official plug
point (`ExpertsInterface.register("kt_cpu", kt_experts_forward)` + `model.set_experts_implementation`),
PEFT through the forward `kt_trl.lora` binds on the outer `ParamWrapper`, and a caller holding an
engine through `routed_experts`.

Hidden states on a CUDA device reach the engine, and its results return, through pinned host
buffers with non-blocking copies ordered by CUDA events (`kt_trl.staging.HostStaging`, one per
model); on the CPU they pass through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref

import torch
from torch import nn

from ._native.errors import KTInvalidArgumentError
from .autograd import RoutedExpertsFunction, ToDevice, ToHost, lora_arguments
from .checkpointing import ActivationBudget, DeviceActivationBudget, KeptForwards, Phase, activation_budgets, call_phase
from .config import KTConfig
from .engine import ExpertEngine, ExpertLoRA
from .staging import HostStaging, StagingStats

logger = logging.getLogger(__name__)

KT_IMPLEMENTATION = "kt_cpu"


class EngineRunner:
    """One MoE layer's routed experts on the CPU engine.

    Args:
        engine: The layer's `ExpertEngine` (packed BF16 weights in native memory).
        layer: The decoder layer holding the block (tells whether it is gradient-checkpointed);
            None outside a model (no activation reuse).
        name: Qualified name, for messages.
        config: `KTConfig` (default `KTConfig()`).
        staging: Moves tensors between the accelerator and the CPU; shared by a model's layers
            (defaults to a new `HostStaging`).
        budgets: The model's host `ActivationBudget` and `DeviceActivationBudget` for kept
            forwards, shared by its layers (default: new ones from `config`).
    """

    def __init__(
        self, engine: ExpertEngine, *, layer: nn.Module | None = None, name: str = "experts",
        config: KTConfig | None = None, staging: HostStaging | None = None,
        budgets: tuple[ActivationBudget, DeviceActivationBudget] | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.config = config if config is not None else KTConfig()
        self.staging = staging if staging is not None else HostStaging()
        self._layer = weakref.ref(layer) if layer is not None else (lambda: None)
        self.configure(self.config, budgets=budgets)
        self.forward_calls = 0
        self.backward_calls = 0
        self.reused_forwards = 0
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0

    def configure(self, config: KTConfig, *, budgets: tuple[ActivationBudget, DeviceActivationBudget] | None = None):
        """Use `config` (and the model's kept-activation budgets) from the next call on; activations
        kept under the old settings are dropped."""
        if getattr(self, "pending", None) is not None:
            self.pending.clear()
        self.config = config
        host, device = budgets if budgets is not None else activation_budgets(config)
        self.pending = KeptForwards(self.name, max_pending=config.max_pending_activations, budget=host,
                                    device_budget=device, staging=self.staging)

    def __call__(self, hidden_states, top_k_index, top_k_weights, *, lora_gate_up=None, lora_down=None):
        """Routed experts `y [T, H]` for `hidden_states [T, H]`, `top_k_index [T, k]`, `top_k_weights [T, k]`.

        `lora_gate_up` / `lora_down` are `ExpertLoRA` views of PEFT parameters (or None).
        """
        scales, factors = lora_arguments(lora_gate_up, lora_down)
        inputs = (hidden_states, top_k_weights, *factors)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        phase = call_phase(self._layer(), reuse=self.config.reuse_checkpointed_activations, needs_grad=needs_grad)
        device, dtype = hidden_states.device, hidden_states.dtype
        if not hidden_states.is_cuda:
            return RoutedExpertsFunction.apply(self, phase, device, hidden_states, top_k_weights, top_k_index, scales,
                                               *factors)
        present = [f for f in factors if f is not None]
        x, w, ids, *moved = ToHost.apply(self.staging, hidden_states, top_k_weights, top_k_index, *present)
        moved = iter(moved)
        factors = [None if f is None else next(moved) for f in factors]
        y = RoutedExpertsFunction.apply(self, phase, device, x, w, ids, scales, *factors)
        return ToDevice.apply(self.staging, y, device, dtype)

    def forward(self, phase: Phase, x, ids, w, lora_gate_up, lora_down, *, device):
        """`(y [T, H] bf16, ExpertActivations)` on the CPU for `x [T, H]` (bf16, CPU), from the engine (into
        pinned buffers when `device` is a CUDA device), or from the first forward when this is its
        recomputation."""
        if phase is Phase.RECOMPUTE:
            entry = self.pending.take(ids)
            if entry is not None:
                self.reused_forwards += 1
                return entry.y.detach(), entry.saved
            if not self.pending.budget.declined:
                logger.warning(
                    "%s: no kept activations match this gradient-checkpointing recomputation; running the CPU "
                    "expert forward again.", self.name,
                )
        self.forward_calls += 1
        start = time.perf_counter()
        with self._named_errors():
            y, saved = self.engine.forward(x, ids, w, lora_gate_up=lora_gate_up, lora_down=lora_down,
                                           save=phase is not Phase.INFERENCE, empty=self.staging.empty_for(device))
        self.forward_seconds += time.perf_counter() - start
        if phase is Phase.FIRST:
            # Bound for a CUDA device, y only feeds the copy there; on the CPU the caller gets it and may change it.
            self.pending.keep(ids, y if torch.device(device).type == "cuda" else y.clone(), saved, device)
        return y, saved

    def backward(self, dy, x, ids, w, saved, **kwargs):
        """The engine's backward (see `ExpertEngine.backward`), counted and timed."""
        self.backward_calls += 1
        start = time.perf_counter()
        try:
            with self._named_errors():
                return self.engine.backward(dy, x, ids, w, saved, **kwargs)
        finally:
            self.backward_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def _named_errors(self):
        """Engine errors name the layer, and a non-finite routing weight its likely cause."""
        try:
            yield
        except KTInvalidArgumentError as error:
            hint = ""
            if "not finite" in str(error):
                hint = (" The router of this layer produced it from non-finite hidden states, so an earlier layer or the"
                        " input holds NaN/Inf: usually a diverged loss (lower the learning rate, set max_grad_norm, check"
                        " the data for empty or extreme examples).")
            raise KTInvalidArgumentError(f"{self.name}: {error}{hint}") from error


def routed_experts(engine: ExpertEngine, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor, *, lora_gate_up: ExpertLoRA | None = None,
                   lora_down: ExpertLoRA | None = None) -> torch.Tensor:
    """Routed experts of one MoE layer, differentiable w.r.t. the hidden states, the routing
    weights and the LoRA factors.

    Args:
        engine (`ExpertEngine`): the layer's packed experts.
        hidden_states (`torch.Tensor`): ``[T, H]``, any device and float dtype.
        top_k_index (`torch.Tensor`): ``[T, k]`` expert ids (``E`` = skip).
        top_k_weights (`torch.Tensor`): ``[T, k]`` final routing weights.
        lora_gate_up, lora_down (`ExpertLoRA`, *optional*): expert LoRA; ``A`` and ``B`` may be
            views of trainable parameters, which then receive gradients.
    Returns:
        `torch.Tensor`: ``[T, H]`` in the dtype and on the device of ``hidden_states``.
    """
    return EngineRunner(engine)(hidden_states, top_k_index, top_k_weights, lora_gate_up=lora_gate_up,
                                lora_down=lora_down)


def kt_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The `"kt_cpu"` entry of transformers' `ExpertsInterface` (experts without expert LoRA).

    A layer `KTConfig.gpu_experts` keeps on the training device runs the implementation the model
    had before preparation.
    """
    runner = getattr(self, "_kt_runner", None)
    if runner is not None:
        return runner(hidden_states, top_k_index, top_k_weights)
    if hasattr(self, "_kt_device_implementation"):
        return _transformers_experts(self)(self, hidden_states, top_k_index, top_k_weights)
    raise RuntimeError(
        f"{type(self).__name__} runs experts_implementation='{KT_IMPLEMENTATION}' but was not prepared by "
        "kt_trl.prepare.prepare_model; prepare the model (KTSFTTrainer does) or call "
        "model.set_experts_implementation('grouped_mm') on a model that still holds its expert weights."
    )


def _transformers_experts(experts: nn.Module):
    """The expert function transformers would call for `experts` under its former implementation."""
    from transformers.integrations.moe import ExpertsInterface

    name = experts._kt_device_implementation
    function = ExpertsInterface._global_mapping.get(name) if name not in (None, "eager", KT_IMPLEMENTATION) else None
    # "eager" is the class's own forward, which transformers' decorator wraps (functools.wraps)
    return function if function is not None else type(experts).forward.__wrapped__


def register_experts_implementation() -> None:
    """Register `kt_experts_forward` as `"kt_cpu"` with transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(KT_IMPLEMENTATION) is not kt_experts_forward:
        ExpertsInterface.register(KT_IMPLEMENTATION, kt_experts_forward)


def expert_counters(model: nn.Module) -> dict[str, float]:
    """Totals over a prepared model's routed layers.

    Returns:
        `dict`: `EngineRunner`s' `forward_calls`, `backward_calls`, `reused_forwards`,
        `forward_seconds`, `backward_seconds`; the `StagingStats` fields (each staging once); and of
        the kept activations in host memory (each budget once) `kept_activation_bytes`,
        `kept_activation_peak_bytes` and `kept_activation_declined` (forwards the host budget turned
        down: they kept nothing), and the same with `kept_activation_device_` for the accelerator
        (there `declined` counts forwards sent on to host memory).
    """
    runner_keys = ("forward_calls", "backward_calls", "reused_forwards", "forward_seconds", "backward_seconds")
    budget_keys = {"bytes": "bytes", "peak_bytes": "peak_bytes", "declined": "declined"}
    totals = {**dict.fromkeys(runner_keys, 0), **StagingStats().as_dict()}
    for where in ("", "device_"):
        totals.update({f"kept_activation_{where}{key}": 0 for key in budget_keys})
    stagings, budgets = {}, {}
    runners = [m._kt_runner for m in model.modules() if isinstance(getattr(m, "_kt_runner", None), EngineRunner)]
    for runner in runners:
        for key in runner_keys:
            totals[key] += getattr(runner, key)
        stagings[id(runner.staging)] = runner.staging
        budgets[id(runner.pending.budget)] = ("", runner.pending.budget)
        budgets[id(runner.pending.device_budget)] = ("device_", runner.pending.device_budget)
    for staging in stagings.values():
        for key, value in staging.stats.as_dict().items():
            totals[key] += value
    for where, budget in budgets.values():
        for key, attr in budget_keys.items():
            totals[f"kept_activation_{where}{key}"] += getattr(budget, attr)
    return totals
