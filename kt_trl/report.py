"""`RoutingReport`: what `prepare_model` did, for logs and tests."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .layouts import ExpertLayout

ADAPTER_GROUPS = ("attention", "router", "experts", "shared experts", "dense mlp", "other")


@dataclass(frozen=True)
class RoutingReport:
    """What `kt_trl.prepare.prepare_model` routed and what trains.

    Attributes:
        family: Registry family, e.g. `"Qwen3-MoE"`.
        layers_routed: Decoder-layer indices whose experts run on the CPU engine.
        experts_per_layer: Experts per routed layer (same order).
        isa: Instruction-set path of the engine (`"amx"`, `"avx512"`, `"avx2"`, `"scalar"`).
        threads: Engine worker threads.
        packed_bytes: Host memory of the packed expert weights, all layers.
        expert_lora: `(parameter name, numel)` of every expert LoRA parameter (CPU, FP32).
        adapters: `(group, trainable numel)` per group of `ADAPTER_GROUPS` that has any.
        untrained_groups: Groups the model has that train nothing (e.g. shared experts that PEFT's
            `"all-linear"` left out), embeddings/norms/lm_head ("other") not counted.
        trainable_parameters: Trainable parameters, expert LoRA included.
        total_parameters: All parameters, the engine-held expert weights included.
        reuse_checkpointed_activations: Whether gradient checkpointing reuses the first expert forward.
        gpu_layers: Decoder-layer indices whose experts stay in transformers' path on the training
            device (`KTConfig.gpu_experts`).
        gpu_expert_bytes: Their expert weights' bytes.
        expert_format: How the engine stores the routed experts (`kt_trl.formats`; layers that differ
            are joined with "/").
    """

    family: str
    layers_routed: tuple[int, ...]
    experts_per_layer: tuple[int, ...]
    isa: str
    threads: int
    packed_bytes: int
    expert_lora: tuple[tuple[str, int], ...]
    adapters: tuple[tuple[str, int], ...]
    untrained_groups: tuple[str, ...]
    trainable_parameters: int
    total_parameters: int
    reuse_checkpointed_activations: bool
    gpu_layers: tuple[int, ...] = ()
    gpu_expert_bytes: int = 0
    expert_format: str = "bf16"

    @property
    def expert_lora_parameters(self) -> int:
        return sum(n for _, n in self.expert_lora)

    def adapters_line(self) -> str:
        """One line: what trains, per group, and the trainable count including expert LoRA."""
        groups = ", ".join(f"{group} {count:,}" for group, count in self.adapters) or "nothing"
        untrained = f"; no adapters on {', '.join(self.untrained_groups)}" if self.untrained_groups else ""
        share = 100.0 * self.trainable_parameters / max(self.total_parameters, 1)
        return (
            f"kt_trl: trainable {groups}{untrained}; {self.trainable_parameters:,} of {self.total_parameters:,} "
            f"parameters ({share:.2f}%), expert LoRA {self.expert_lora_parameters:,} on the CPU"
        )

    def summary(self) -> str:
        """A few human-readable lines."""
        layers = len(self.layers_routed)
        experts = sorted(set(self.experts_per_layer))
        on_device = (f"; {len(self.gpu_layers)} layer(s) keep theirs on the training device "
                     f"({self.gpu_expert_bytes / 2**20:.1f} MiB)" if self.gpu_layers else "")
        return "\n".join(
            (
                f"kt_trl: {self.family}: routed experts of {layers} layer(s) "
                f"({'/'.join(map(str, experts))} experts each) to the CPU engine "
                f"[{self.isa}, {self.threads} thread(s)], {self.packed_bytes / 2**20:.1f} MiB packed "
                f"({self.expert_format.upper()}){on_device}",
                self.adapters_line(),
                "kt_trl: gradient checkpointing "
                + ("reuses the first CPU expert forward" if self.reuse_checkpointed_activations else "recomputes the CPU expert forward"),
            )
        )


def _group(name: str, layout: ExpertLayout) -> str:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part != layout.block_attr or i == 0 or not parts[i - 1].isdigit():
            continue
        child = parts[i + 1]
        if child == "experts":
            return "experts"
        if child == layout.router_attr:
            return "router"
        if child in layout.shared_attrs:
            return "shared experts"
        return "dense mlp"
    if any(p in ("self_attn", "attention", "attn") for p in parts):
        return "attention"
    return "other"


def adapter_groups(model: nn.Module, layout: ExpertLayout) -> tuple[tuple[tuple[str, int], ...], tuple[str, ...]]:
    """Trainable parameter counts per group (`ADAPTER_GROUPS` order), and the groups that train nothing."""
    counts = dict.fromkeys(ADAPTER_GROUPS, 0)
    present = set()
    for name, param in model.named_parameters():
        group = _group(name, layout)
        present.add(group)
        if param.requires_grad:
            counts[group] += param.numel()
    trained = tuple((group, n) for group, n in counts.items() if n)
    untrained = tuple(g for g in ADAPTER_GROUPS if g in present and g != "other" and not counts[g])
    return trained, untrained
