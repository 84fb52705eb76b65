"""`prepare_model`: route a transformers MoE model's experts through the CPU engine.

unwrap containers → match the family in the registry → find the MoE blocks → per block: pack the
experts into an `ExpertEngine` (or take the one `weights.install_engine` gave it), release the HF
tensors, keep the module on the CPU, bind expert LoRA → switch the model to the `"kt_cpu"` experts
implementation → `RoutingReport`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .checkpointing import activation_budgets, nbytes
from .config import KTConfig
from .containers import MoEBlock, find_decoder_layers, find_moe_blocks, unwrap_model
from .distributed import ignore_in_ddp, pin_to_rank_cores
from .experts import KT_IMPLEMENTATION, EngineRunner, register_experts_implementation
from .host_copy import host_engines
from .layouts import EXPERT_PARAMETERS, ExpertLayout, check_experts_module, engine_dims, match_layout
from .lora import bind_expert_lora, requested_expert_lora
from .placement import expert_lora_params, gpu_layers
from .progress import progress_bar
from .report import RoutingReport, adapter_groups
from .staging import HostStaging
from .weights import attach_state_hooks, keep_on_cpu, pack_experts, release_expert_weights, take_installed_engine

logger = logging.getLogger(__name__)


def prepare_model(
    model: nn.Module, config: KTConfig | None = None, *, expert_lora_requested: bool | None = None,
    tokens_per_batch: int | None = None, gradient_checkpointing: bool | None = None, device=None,
) -> RoutingReport:
    """Route the routed experts of `model` through the native CPU engine, in place; the layers
    `KTConfig.gpu_experts` keeps on the accelerator stay in transformers' own path.

    Runs after PEFT wrapping and before device placement; idempotent (a second call returns the
    same report, binding expert LoRA wrappers added since).

    Args:
        model (`nn.Module`):
            A transformers MoE causal LM, possibly inside `PeftModel`, DDP/FSDP or value-head wrappers.
        config (`KTConfig`, *optional*):
            Engine settings; defaults to `KTConfig()` for a new model and, for a prepared one, to
            the settings it has. A different config on a prepared model is applied (the ISA and
            threads of the engine, activation reuse and its budgets).
        expert_lora_requested (`bool`, *optional*):
            Whether the user asked for LoRA on the experts; read from the `PeftModel`'s config when
            not given. If asked and no expert got an adapter, this raises.
        tokens_per_batch (`int`, *optional*), gradient_checkpointing (`bool`, *optional*):
            The micro-batch training will run, for `gpu_experts="auto"`'s activation estimate
            (`KTSFTTrainer` passes them from its `SFTConfig`).
        device (`torch.device`, *optional*):
            The device the model will train on (`KTSFTTrainer` passes `args.device`). With
            `gpu_experts="auto"`, experts stay on the accelerator only when it is a CUDA device;
            defaults to where the model's parameters are now.

    Returns:
        `RoutingReport`

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> from kt_trl.prepare import prepare_model
    >>> experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    >>> peft_model = get_peft_model(model, LoraConfig(r=4, target_parameters=experts))  # a Qwen3-MoE, Mixtral, ...
    >>> prepare_model(peft_model).layers_routed
    (0, 1)
    ```
    """
    base = unwrap_model(model)
    previous = getattr(base, "_kt_report", None)
    if previous is not None and config is not None and config != base._kt_config:
        _apply_config(base, config)
    elif previous is not None and not _unbound_wrappers(base):
        return previous
    config = config or getattr(base, "_kt_config", None) or KTConfig()
    layout = match_layout(base)
    blocks = find_moe_blocks(find_decoder_layers(base), layout)
    if not blocks:
        raise ValueError(
            f"{layout.family}: no decoder layer has a '{layout.block_attr}.experts' module; nothing to route."
        )
    if previous is None:
        on_device = gpu_layers(base, blocks, config, tokens=tokens_per_batch, checkpointed=gradient_checkpointing,
                               device=device if device is not None else _parameter_device(base))
        _route_blocks(base, [b for b in blocks if b.index not in on_device], layout, config,
                      on_device=[b for b in blocks if b.index in on_device])
    on_device = [b for b in blocks if getattr(b.experts, "_kt_on_device", False)]
    blocks = [b for b in blocks if not getattr(b.experts, "_kt_on_device", False)]
    adapted = [bind_expert_lora(block, layout) for block in blocks] + [bool(b.wrappers) for b in on_device]
    for block in blocks:  # the outermost module at `block.experts` owns host-only tensors
        keep_on_cpu(block.slot)
    if expert_lora_requested is None:
        expert_lora_requested = any(requested_expert_lora(c) for c in (getattr(model, "peft_config", None) or {}).values())
    if expert_lora_requested and not any(adapted):
        raise ValueError(_no_expert_lora_message(layout))
    ignore_in_ddp(model)
    report = _build_report(model, base, blocks, layout, config, on_device=on_device)
    base._kt_report, base._kt_config = report, config
    logger.info(report.summary())
    return report


def _route_blocks(base: nn.Module, blocks: list[MoEBlock], layout: ExpertLayout, config: KTConfig, *,
                  on_device: list[MoEBlock]) -> None:
    for block in on_device:  # transformers' own expert path, on whatever device the model trains on
        block.experts._kt_on_device = True
    if not blocks:
        return
    for block in blocks:
        check_experts_module(layout, block.experts, where=block.name)
        if block.experts.gate_up_proj.is_meta and not hasattr(block.experts, "_kt_engine"):
            raise ValueError(
                f"{block.name}: the experts' weights are on the meta device (the model was built without its weights), "
                "so there is nothing to pack. Load the model with its weights (from_pretrained, or kt_trl.load_model, "
                "which streams the experts into the engine), or give each layer an engine with "
                "kt_trl.weights.install_engine before preparing."
            )
    _check_expert_grads(blocks, config)
    _warn_if_not_bf16(blocks)
    _configure_runtime(config)
    _switch_experts_implementation(base, blocks, on_device)
    staging = HostStaging()  # one for all layers: its in-flight copies are released on any layer's call
    budgets = activation_budgets(config)  # model-wide
    packed = dict(zip(map(id, blocks), _packed_engines(blocks, layout, packed_format(config))))
    for block in blocks:
        engine = packed[id(block)] if id(block) in packed else take_installed_engine(block.experts)
        release_expert_weights(block.experts)
        block.experts._kt_runner = EngineRunner(engine, layer=block.layer, name=block.name, config=config,
                                                staging=staging, budgets=budgets)
        keep_on_cpu(block.experts)  # also once PEFT's unload() puts it back in the model
        attach_state_hooks(block.experts, layout)


def _packed_engines(blocks: list[MoEBlock], layout: ExpertLayout, format: str) -> list:
    """Engines packed from the module weights of the blocks without an installed one (in their order):
    one copy per host when several ranks share it (`kt_trl.host_copy`)."""
    blocks = [b for b in blocks if not hasattr(b.experts, "_kt_engine")]
    if not blocks:
        return []

    def fill(memories):
        with progress_bar(total=len(blocks), desc="Packing experts for the CPU engine", unit="layer") as bar:
            engines = []
            for block, memory in zip(blocks, memories):
                engines.append(pack_experts(block.experts, layout, format, memory=memory))
                bar.update()
            return engines

    def attach(i, memory):
        return pack_experts(blocks[i].experts, layout, format, memory=memory, filled=True)

    sizes = [(*engine_dims(layout, b.experts), format, None) for b in blocks]
    return host_engines(sizes, fill, attach)


def packed_format(config: KTConfig) -> str:
    """The engine format of experts packed from the model's own weights: `"auto"` keeps their BF16."""
    return "bf16" if config.expert_format == "auto" else config.expert_format


def _parameter_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def _apply_config(base: nn.Module, config: KTConfig) -> None:
    """Give an already-prepared model's engine and runners the settings of `config`."""
    placed = base._kt_config
    if config.expert_format != placed.expert_format:
        raise ValueError(
            f"This model was prepared with expert_format={placed.expert_format!r}; its experts are packed in that "
            "format and cannot be repacked in place. Pass the same expert_format (or no kt_config), or prepare a "
            "freshly loaded model."
        )
    if (config.gpu_experts, config.max_gpu_memory_gb) != (placed.gpu_experts, placed.max_gpu_memory_gb):
        raise ValueError(
            f"This model was prepared with gpu_experts={placed.gpu_experts!r}, max_gpu_memory_gb="
            f"{placed.max_gpu_memory_gb!r}; which layers keep their experts on the GPU cannot change afterwards. "
            "Pass those same values (or no kt_config), or prepare a freshly loaded model."
        )
    _configure_runtime(config)
    budgets = activation_budgets(config)
    for runner in _runners(base):
        runner.configure(config, budgets=budgets)
    logger.info("kt_trl: applied %s to the prepared model.", config)


def _runners(base: nn.Module) -> list[EngineRunner]:
    return [m._kt_runner for m in base.modules() if isinstance(getattr(m, "_kt_runner", None), EngineRunner)]


def _switch_experts_implementation(base: nn.Module, blocks: list[MoEBlock], on_device: list[MoEBlock]) -> None:
    """`set_experts_implementation("kt_cpu")`, checked on every block before any weight moves; the
    blocks kept on the device remember the implementation they ran (`kt_experts_forward` calls it)."""
    register_experts_implementation()
    previous = base.config._experts_implementation
    for block in on_device:
        block.experts._kt_device_implementation = previous
    base.set_experts_implementation(KT_IMPLEMENTATION)
    for block in blocks + on_device:
        implementation = getattr(getattr(block.experts, "config", None), "_experts_implementation", None)
        if implementation != KT_IMPLEMENTATION:
            base.set_experts_implementation(previous)
            raise ValueError(
                f"{block.name}: set_experts_implementation('{KT_IMPLEMENTATION}') does not reach this experts "
                f"module (it would run {implementation!r}), so kt_trl cannot route it; nothing was changed. "
                "Please report this model class to kt_trl."
            )


def _warn_if_not_bf16(blocks: list[MoEBlock]) -> None:
    dtypes = {block.experts.gate_up_proj.dtype for block in blocks} - {torch.bfloat16}
    if dtypes:
        logger.warning(
            "kt_trl: this model's routed experts are %s; the CPU engine computes them in BF16 (weights and "
            "inputs rounded to BF16, FP32 accumulation, outputs returned as %s). Everything else keeps its dtype.",
            "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
            "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes)),
        )


def _frozen_expert_params(experts: nn.Module) -> list[torch.Tensor]:
    """The parameters the engine holds frozen: the 3-D weights and (gpt-oss) their biases."""
    names = (*EXPERT_PARAMETERS, *(f"{name}_bias" for name in EXPERT_PARAMETERS))
    return [p for name in names if isinstance(p := getattr(experts, name, None), torch.Tensor)]


def _check_expert_grads(blocks: list[MoEBlock], config: KTConfig) -> None:
    trainable = [b.name for b in blocks if any(p.requires_grad for p in _frozen_expert_params(b.experts))]
    if not trainable:
        return
    if not config.freeze_experts:
        raise ValueError(
            f"The routed experts' base weights require gradients ({trainable[0]}, ...), but the CPU engine holds "
            "them frozen. Train LoRA on them (peft_config=LoraConfig(target_parameters=['mlp.experts.gate_up_proj', "
            "'mlp.experts.down_proj'], ...)), or pass kt_config=KTConfig(freeze_experts=True) to freeze them and "
            "train the rest of the model."
        )
    # release_expert_weights replaces the weights by frozen placeholders; biases stay, frozen
    for block in blocks:
        for param in _frozen_expert_params(block.experts):
            param.requires_grad_(False)
    logger.info("kt_trl: freezing the routed experts' base weights of %d layer(s) (KTConfig.freeze_experts).", len(blocks))


def _configure_runtime(config: KTConfig) -> dict:
    from ._native import configure, runtime_info

    pin_to_rank_cores()  # several ranks on this host: each its share (the default threads count within it)
    configure(isa=config.isa, threads=config.threads)
    return runtime_info()


def _unbound_wrappers(base: nn.Module) -> bool:
    layout = match_layout(base)
    blocks = find_moe_blocks(find_decoder_layers(base), layout)
    return any(b.wrappers and not getattr(b.wrappers[0], "_kt_routed", False) for b in blocks
               if not getattr(b.experts, "_kt_on_device", False))


def _no_expert_lora_message(layout: ExpertLayout) -> str:
    target = f"['{layout.block_attr}.experts.gate_up_proj', '{layout.block_attr}.experts.down_proj']"
    return (
        f"LoRA on the routed experts was requested, but PEFT adapted no expert of this {layout.family} model "
        f"(target_modules='all-linear' reaches the fused experts only for some families). Add "
        f"target_parameters={target} to your LoraConfig to train expert LoRA, or list target_modules explicitly "
        "(e.g. ['q_proj', 'k_proj', 'v_proj', 'o_proj']) to train without it."
    )


def _build_report(model, base, blocks, layout, config, *, on_device: list[MoEBlock]) -> RoutingReport:
    from ._native import runtime_info

    info = runtime_info()
    on_cpu = {id(p) for b in blocks for p in expert_lora_params(b)}
    expert_lora = tuple((name, p.numel()) for name, p in model.named_parameters() if p.requires_grad and id(p) in on_cpu)
    params = list(model.parameters())
    adapters, untrained = adapter_groups(model, layout)
    return RoutingReport(
        family=layout.family,
        layers_routed=tuple(b.index for b in blocks),
        experts_per_layer=tuple(b.experts._kt_runner.engine.num_experts for b in blocks),
        isa=str(info.get("isa")),
        threads=int(info.get("threads") or 0),
        packed_bytes=sum(int(b.experts._kt_runner.engine.packed_bytes) for b in blocks),
        expert_format="/".join(sorted({b.experts._kt_runner.engine.format for b in blocks})) or "bf16",
        expert_lora=expert_lora,
        adapters=adapters,
        untrained_groups=untrained,
        trainable_parameters=sum(p.numel() for p in params if p.requires_grad),
        total_parameters=sum(p.numel() for p in params),
        reuse_checkpointed_activations=config.reuse_checkpointed_activations,
        gpu_layers=tuple(b.index for b in on_device),
        gpu_expert_bytes=nbytes(*(p for b in on_device for p in b.experts.parameters(recurse=False))),
    )
