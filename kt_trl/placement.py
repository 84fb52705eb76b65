"""Which MoE layers keep their routed experts on the accelerator, and which go to the CPU engine.

[NOTE] Where a model fits the GPU, plain PEFT on the GPU is an order of magnitude faster than the
CPU engine, and where it half fits, every layer kept there takes its share of the step off the
CPU. The split is by whole layers: a GPU-resident layer keeps its experts in transformers' own
expert path (PEFT's own expert LoRA, nothing staged), so saving, resume, merging and
`PeftModel.from_pretrained` see the same fused parameters whatever the split.

`KTConfig(gpu_experts="auto")` keeps as many layers as fit in the accelerator's memory
(`KTConfig(max_gpu_memory_gb=...)` caps it) after what training needs besides them: the other
weights, the LoRA parameters with their gradients and AdamW state, and an activation estimate for
the micro-batch; an integer keeps that many experts (whole layers of them); `"none"` keeps none.
Layers whose engine was installed beforehand (`weights.install_engine`) stay on the CPU; layers
`kt_trl.load_model` already read onto the training device (`LOADED_ON_DEVICE`) stay there. Under a
process group every rank keeps the same layers (the fewest any rank's memory allows): the ranks of a
host share one packed copy of the others.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import nbytes
from .config import KTConfig
from .containers import MoEBlock

logger = logging.getLogger(__name__)

# Bytes per trainable parameter: FP32 weight, gradient and AdamW's two moments.
TRAINABLE_BYTES = 16
MARGIN_FRACTION, MARGIN_BYTES = 0.08, 2 * 10**9  # allocator fragmentation, CUDA context, workspaces
# Set on an experts module whose weights `load_model` read onto the training device for this split.
LOADED_ON_DEVICE = "_kt_loaded_on_device"


@dataclass(frozen=True)
class Unprepared:
    """What the budget counts for a model without adapters yet, built on the meta device (a plan, a load).

    Attributes:
        weight_bytes: Bytes per frozen weight in the dtype training will use.
        other_lora: LoRA parameters outside the routed experts.
        expert_lora_per_layer: LoRA parameters on one MoE layer's experts.
    """

    weight_bytes: int
    other_lora: int
    expert_lora_per_layer: int


@dataclass(frozen=True)
class GPUBudget:
    """How the accelerator's memory was shared out (bytes).

    Attributes:
        capacity: Device memory considered (free memory, capped by `max_gpu_memory_gb`).
        reserved: What training needs besides the GPU-resident experts (weights, LoRA state,
            activations, margin).
        per_layer: One layer's routed experts with their LoRA state.
        layers: How many layers' experts fit.
    """

    capacity: int
    reserved: int
    per_layer: int
    layers: int


def expert_lora_params(block: MoEBlock) -> list[torch.Tensor]:
    """The LoRA A and B parameters of `block`'s expert `ParamWrapper`s."""
    return [p for w in block.wrappers for adapters in (w.lora_A, w.lora_B) for p in adapters.parameters()]


def _expert_layer_bytes(block: MoEBlock, unprepared: Unprepared | None) -> int:
    if unprepared is not None:
        frozen = sum(p.numel() for p in block.experts.parameters(recurse=False)) * unprepared.weight_bytes
        return frozen + TRAINABLE_BYTES * unprepared.expert_lora_per_layer
    frozen = nbytes(*block.experts.parameters(recurse=False))
    return frozen + TRAINABLE_BYTES * sum(p.numel() for p in expert_lora_params(block))


def activation_bytes(model: nn.Module, tokens: int, *, checkpointed: bool) -> int:
    """A rough peak of activation memory for a micro-batch of `tokens` tokens.

    With gradient checkpointing: every layer's input, plus one layer recomputed with its expert
    intermediates, plus the logits in BF16 and FP32 with their gradient. Without: every layer's
    intermediates.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    top_k = getattr(config, "num_experts_per_tok", 8)
    inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden)
    per_layer = tokens * (12 * hidden + 3 * top_k * 2 * inter) * 2
    logits = tokens * vocab * (2 + 4 + 4)
    return (layers * tokens * hidden * 2 + 2 * per_layer if checkpointed else layers * per_layer) + logits


def gpu_budget(model: nn.Module, blocks: list[MoEBlock], config: KTConfig, *, tokens: int, checkpointed: bool,
               device: torch.device, unprepared: Unprepared | None = None) -> GPUBudget:
    """How many of `blocks`' layers fit on `device` next to the rest of training (`unprepared`: the
    model has no adapters yet, its dtype and LoRA given instead)."""
    free, _ = torch.cuda.mem_get_info(device)
    capacity = free if config.max_gpu_memory_gb is None else min(free, int(config.max_gpu_memory_gb * 1e9))
    expert_params = {id(p) for b in blocks for p in b.experts.parameters(recurse=False)}
    lora_params = {id(p) for b in blocks for p in expert_lora_params(b)}
    others = [p for p in model.parameters() if id(p) not in expert_params and id(p) not in lora_params]
    if unprepared is None:
        weights, trainable = nbytes(*others), sum(p.numel() for p in others if p.requires_grad)
    else:
        weights, trainable = sum(p.numel() for p in others) * unprepared.weight_bytes, unprepared.other_lora
    reserved = (weights + TRAINABLE_BYTES * trainable + activation_bytes(model, tokens, checkpointed=checkpointed)
                + int(MARGIN_FRACTION * capacity) + MARGIN_BYTES)
    per_layer = max(_expert_layer_bytes(blocks[0], unprepared), 1) if blocks else 1
    return GPUBudget(capacity, reserved, per_layer, max(0, (capacity - reserved) // per_layer))


def training_device(args=None) -> torch.device:
    """The device training runs on: `args.device` (a `TrainingArguments`), else this process's CUDA
    device (`LOCAL_RANK`) where there is one, else the CPU."""
    if getattr(args, "use_cpu", False):
        return torch.device("cpu")
    if args is not None and hasattr(args, "device"):
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def gpu_layers(model: nn.Module, blocks: list[MoEBlock], config: KTConfig, *, tokens: int | None,
               checkpointed: bool | None, device, unprepared: Unprepared | None = None) -> set[int]:
    """Decoder-layer indices whose experts stay in transformers' path on the training device.

    Args:
        model: The unwrapped model (on the CPU or the meta device, before placement).
        blocks: Its MoE blocks.
        config: `KTConfig` (`gpu_experts`, `max_gpu_memory_gb`).
        tokens: Tokens per micro-batch, for the activation estimate (None: 4096).
        checkpointed: Whether training uses gradient checkpointing (None: TRL's default, yes).
        device: The training device; `"auto"` keeps experts there only when it is a CUDA device.
        unprepared: For a model without adapters yet on the meta device: its dtype and LoRA.
    """
    free = [b for b in blocks if not hasattr(b.experts, "_kt_engine")]  # installed engines stay on the CPU
    if config.gpu_experts == "none" or not free:
        return set()
    loaded = [b for b in free if getattr(b.experts, LOADED_ON_DEVICE, False)]
    if config.gpu_experts == "auto" and loaded:   # load_model made this choice and read them there
        return {b.index for b in loaded}
    if config.gpu_experts == "auto":
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return set()
        budget = gpu_budget(model, blocks, config, tokens=tokens or 4096, checkpointed=checkpointed is not False,
                            device=device, unprepared=unprepared)
        count = _fewest_over_ranks(min(budget.layers, len(free)))
        logger.info("kt_trl: %.1f GB of GPU memory, %.1f GB for the rest of training, %.2f GB per layer of experts: "
                    "%d of %d MoE layers keep their experts on the GPU.", budget.capacity / 1e9,
                    budget.reserved / 1e9, budget.per_layer / 1e9, count, len(blocks))
    else:
        experts = free[0].experts.gate_up_proj.shape[0]
        count = min(config.gpu_experts // experts, len(free))
        if config.gpu_experts % experts:
            logger.warning("kt_trl: gpu_experts=%d keeps whole layers of %d experts: %d layer(s), %d experts.",
                           config.gpu_experts, experts, count, count * experts)
    return {b.index for b in spread(free, count)}


def spread(items: list, count: int) -> list:
    """`count` of `items` spaced evenly, the first included: GPU layers between CPU layers, so that work
    overlapping the two devices could alternate between them (not timed against the first `count`)."""
    return [items[i * len(items) // count] for i in range(count)] if count else []


def _fewest_over_ranks(count: int) -> int:
    """The smallest `count` of all ranks of the process group (this one's without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, count)
    return min(counts)
