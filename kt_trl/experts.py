"""Routing one layer's fused experts through the CPU engine.

`CPUExperts` owns a layer's packed experts (an `ExpertEngine`) and runs them through
`autograd.RoutedExpertsFunction`, the `torch.autograd.Function` over the engine's forward/backward. It hangs off
the HF experts module as `_kt_experts`; transformers reaches it through the official plug point
(`ExpertsInterface.register("kt_cpu", kt_experts_forward)` + `model.set_experts_implementation`), PEFT
through the forward `kt_trl.lora` binds on the outer `ParamWrapper`.

With gradient checkpointing, the first forward of a checkpointed layer keeps what its backward
needs (`kt_trl.kept_activations`; `KTConfig.reuse_checkpointed_activations`), and the
recomputation inside backward takes it back instead of calling the engine a second time.

Hidden states on a CUDA device reach the engine, and its results return, through pinned host
buffers with non-blocking copies ordered by CUDA events (`kt_trl.staging.HostStaging`, one per
model); on the CPU they pass through unchanged.
"""

from __future__ import annotations

import functools
import logging
import time
import types
import weakref
from typing import Any

import torch
from torch import nn

from . import worker
from .autograd import FIRST, INFERENCE, RECOMPUTE, RoutedExpertsFunction, lora_arguments
from .config import KTConfig
from .deferred_grads import DEFERRED
from .kept_activations import ActivationBudget, DeviceActivationBudget, KeptForwards, activation_budgets
from .staging import HostStaging, StagingStats

logger = logging.getLogger(__name__)

KT_IMPLEMENTATION = "kt_cpu"


def _in_backward() -> bool:
    # torch has no public "is autograd's engine running" query; the graph-task id is -1 outside
    # backward in every torch 2.x release.
    return torch._C._current_graph_task_id() != -1


def _reentrant(layer: nn.Module) -> bool:
    """Whether `layer` is checkpointed with `use_reentrant=True` (transformers binds the kwargs with partial)."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return bool(getattr(function, "keywords", {}).get("use_reentrant", False))


class CPUExperts:
    """One MoE layer's routed experts on the CPU engine.

    Args:
        engine: The layer's `ExpertEngine` (packed BF16 weights in native memory).
        layer: The decoder layer holding the block (tells whether it is gradient-checkpointed).
        name: Qualified name, for messages.
        config: `KTConfig`.
        staging: Moves tensors between the accelerator and the CPU; shared by a model's layers
            (defaults to a new `HostStaging`).
        budgets: The model's host `ActivationBudget` and `DeviceActivationBudget` for kept
            forwards, shared by its layers (default: new ones from `config`).
    """

    def __init__(
        self, engine: Any, *, layer: nn.Module, name: str, config: KTConfig, staging: HostStaging | None = None,
        budgets: tuple[ActivationBudget, DeviceActivationBudget] | None = None,
    ) -> None:
        self.engine = engine
        self.name = name
        self.config = config
        self.staging = staging if staging is not None else HostStaging()
        self._layer = weakref.ref(layer)
        host, device = budgets if budgets is not None else activation_budgets(config)
        self.pending = KeptForwards(name, max_pending=config.max_pending_activations, budget=host,
                                    device_budget=device, staging=self.staging)
        self.deferred = DEFERRED if config.overlap_lora_grads else None
        self.shared_ahead = None  # a SharedExpertsAhead when the block's shared experts can overlap
        self.forward_calls = 0
        self.backward_calls = 0
        self.reused_forwards = 0
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0

    def __call__(self, hidden_states, top_k_index, top_k_weights, *, lora_gate_up=None, lora_down=None):
        """Routed experts `y [T, H]` for `hidden_states [T, H]`, `top_k_index [T, k]`, `top_k_weights [T, k]`.

        `lora_gate_up` / `lora_down` are `ExpertLoRA` views of PEFT parameters (or None).
        """
        scales, factors = lora_arguments(lora_gate_up, lora_down)
        inputs = (hidden_states, top_k_weights, *factors)
        needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
        phase = self._phase(needs_grad)
        meanwhile = None
        if self.shared_ahead is not None and self.shared_ahead.usable:
            meanwhile = functools.partial(self.shared_ahead.compute, hidden_states, torch.is_grad_enabled())
        return RoutedExpertsFunction.apply(self, phase, hidden_states, top_k_weights, top_k_index, scales, *factors,
                                           meanwhile)

    def _phase(self, needs_grad: bool) -> str | None:
        """FIRST / RECOMPUTE inside a checkpointed layer (when reusing activations), INFERENCE or None."""
        layer = self._layer()
        checkpointed = (
            self.config.reuse_checkpointed_activations
            and layer is not None
            and getattr(layer, "gradient_checkpointing", False)
            and layer.training
        )
        if checkpointed:
            if _in_backward():
                return RECOMPUTE
            # reentrant checkpointing runs the first forward under no_grad
            if torch.is_grad_enabled() or _reentrant(layer):
                return FIRST
        return None if needs_grad else INFERENCE

    def forward(self, phase, x, ids, w, lora_gate_up, lora_down, *, device, dtype, meanwhile=None):
        """`(y [T, H] as dtype on device, ExpertActivations)` for `x [T, H]` (bf16, CPU), from the
        engine, or from the first forward when this is its recomputation. `meanwhile()`, if given,
        runs on this thread while the engine works on the worker thread."""
        if phase == RECOMPUTE:
            entry = self.pending.take(ids)
            if entry is not None:
                self.reused_forwards += 1
                if meanwhile is not None:
                    meanwhile()
                return entry.y, entry.saved
            if not self.pending.budget.declined:
                logger.warning(
                    "%s: no kept activations match this gradient-checkpointing recomputation; running the CPU "
                    "expert forward again.", self.name,
                )
        self.forward_calls += 1
        start = time.perf_counter()
        call = functools.partial(self.engine.forward, x, ids, w, lora_gate_up=lora_gate_up, lora_down=lora_down,
                                 save=phase != INFERENCE, empty=self.staging.empty_for(device))
        if meanwhile is None:
            y, saved = call()
        else:
            running = worker.submit(call)
            meanwhile()
            y, saved = running.result()
        self.forward_seconds += time.perf_counter() - start
        y = self.staging.to_device(y, device=device, dtype=dtype)
        if phase == FIRST:
            self.pending.keep(ids, y, saved)
        return y, saved

    def backward(self, dy, x, ids, w, saved, **kwargs):
        """The engine's backward (see `ExpertEngine.backward`), counted and timed."""
        self.backward_calls += 1
        if self.shared_ahead is not None:
            self.shared_ahead.discard()  # this layer's forward and recomputation are over
        start = time.perf_counter()
        try:
            return self.engine.backward(dy, x, ids, w, saved, **kwargs)
        finally:
            self.backward_seconds += time.perf_counter() - start

    def clear_pending(self) -> None:
        self.pending.clear()


def kt_experts_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """The `"kt_cpu"` entry of transformers' `ExpertsInterface` (experts without expert LoRA)."""
    runner = getattr(self, "_kt_experts", None)
    if runner is None:
        raise RuntimeError(
            f"{type(self).__name__} runs experts_implementation='{KT_IMPLEMENTATION}' but was not prepared by "
            "kt_trl.prepare.prepare_model; prepare the model (KTSFTTrainer does) or call "
            "model.set_experts_implementation('grouped_mm') on a model that still holds its expert weights."
        )
    return runner(hidden_states, top_k_index, top_k_weights)


def register_experts_implementation() -> None:
    """Register `kt_experts_forward` as `"kt_cpu"` with transformers (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(KT_IMPLEMENTATION) is not kt_experts_forward:
        ExpertsInterface.register(KT_IMPLEMENTATION, kt_experts_forward)


def _stay_on_cpu(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`Module._apply` for a module whose tensors live in host memory: moves and casts pass it by."""
    return self


def keep_on_cpu(module: nn.Module) -> None:
    """Make `.to()/.cuda()/.half()` leave `module` (and everything under it) where it is."""
    if not getattr(module, "_kt_stays_on_cpu", False):
        module._apply = types.MethodType(_stay_on_cpu, module)
        module._kt_stays_on_cpu = True


def release_expert_weights(experts: nn.Module) -> None:
    """Replace the HF 3-D expert parameters by zero-byte placeholders of the same shape and dtype.

    The engine holds the only copy; the placeholders keep PEFT (which reads the shapes), parameter
    counts and `state_dict` keys working, and fail loudly on writes (they are zero-stride).
    """
    for name in ("gate_up_proj", "down_proj"):
        param = getattr(experts, name)
        if getattr(param, "_kt_placeholder", False):
            continue
        placeholder = torch.zeros((), dtype=param.dtype, device="cpu").expand(param.shape)
        new = nn.Parameter(placeholder, requires_grad=False)
        new._kt_placeholder = True
        setattr(experts, name, new)


def pack_experts(experts: nn.Module, layout):
    """Pack an experts module (in its family's `layout`) into an `ExpertEngine`, expert by expert."""
    from .expert_weights import pack_experts as pack_layout

    return pack_layout(layout, experts)


def install_engine(experts: nn.Module, engine) -> None:
    """Give a fused experts module a prebuilt `ExpertEngine` and release its Hugging Face weights.

    For expert weights that never exist as one HF tensor: a model built on the meta device whose
    experts are generated or streamed layer by layer into `ExpertEngine.from_experts`.
    `prepare_model` (and so `KTSFTTrainer`) then routes the module through `engine` instead of
    packing its parameters. From here on the module stays on the CPU through `.to()` and
    `.to_empty()`, and its base weights are frozen.

    Args:
        experts (`nn.Module`):
            A fused experts module with `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` (real
            or on the meta device), not yet wrapped by PEFT nor prepared.
        engine (`ExpertEngine`):
            The layer's experts, packed, with the same `(E, H, I)`.

    Example:

    ```python
    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(config)
    >>> for layer in model.model.layers:
    ...     install_engine(layer.mlp.experts, ExpertEngine.from_experts(E, H, I, experts_of(layer)))
    >>> model.to_empty(device="cuda")   # everything but the experts; initialise it, then train
    ```
    """
    if hasattr(experts, "_kt_experts") or hasattr(experts, "base_layer"):
        raise ValueError(
            f"install_engine needs the bare experts module before PEFT wrapping and preparation; got "
            f"{type(experts).__name__} that is already {'prepared' if hasattr(experts, '_kt_experts') else 'wrapped'}. "
            "Install engines right after building the model."
        )
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise ValueError(f"{type(experts).__name__} has no 3-D gate_up_proj / down_proj parameters to replace.")
    num_experts, two_inter, hidden = gate_up.shape
    expected = (num_experts, hidden, two_inter // 2)
    if tuple(down.shape) != expected or tuple(engine.dims) != expected:
        raise ValueError(
            f"{type(experts).__name__} has gate_up_proj {list(gate_up.shape)} [E, 2I, H] and down_proj "
            f"{list(down.shape)} [E, H, I], but the engine holds (E, H, I) = {tuple(engine.dims)}; build it with "
            f"ExpertEngine.from_experts({', '.join(map(str, expected))}, ...)."
        )
    release_expert_weights(experts)
    keep_on_cpu(experts)
    experts._kt_engine = engine


def take_installed_engine(experts: nn.Module):
    """The engine `install_engine` gave `experts`, handed over once; None if it has none."""
    engine = getattr(experts, "_kt_engine", None)
    if engine is not None:
        del experts._kt_engine
    return engine


def expert_counters(model: nn.Module) -> dict[str, float]:
    """Totals over a prepared model's routed layers.

    Returns:
        `dict`: `CPUExperts`' `forward_calls`, `backward_calls`, `reused_forwards`,
        `forward_seconds`, `backward_seconds`; the `StagingStats` fields (each staging once); and of
        the kept activations in host memory (each budget once) `kept_activation_bytes`,
        `kept_activation_peak_bytes` and `kept_activation_declined` (forwards the host budget turned
        down: they kept nothing), and the same with `kept_activation_device_` for the accelerator
        (there `declined` counts forwards sent on to host memory); `deferred_lora_jobs` and
        `deferred_lora_seconds` of the process's overlapped LoRA-gradient jobs; `shared_expert_hits`,
        shared-expert calls answered by a computation overlapped with the engine.
    """
    runner_keys = ("forward_calls", "backward_calls", "reused_forwards", "forward_seconds", "backward_seconds")
    budget_keys = {"bytes": "bytes", "peak_bytes": "peak_bytes", "declined": "declined"}
    totals = {**dict.fromkeys(runner_keys, 0), **StagingStats().as_dict()}
    for where in ("", "device_"):
        totals.update({f"kept_activation_{where}{key}": 0 for key in budget_keys})
    stagings, budgets = {}, {}
    runners = [m._kt_experts for m in model.modules() if isinstance(getattr(m, "_kt_experts", None), CPUExperts)]
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
    totals["deferred_lora_jobs"], totals["deferred_lora_seconds"] = DEFERRED.jobs, DEFERRED.seconds
    totals["shared_expert_hits"] = sum(r.shared_ahead.hits for r in runners if r.shared_ahead is not None)
    return totals
