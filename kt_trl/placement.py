"""Which routed experts stay on the accelerator: whole layers, or a share of every CPU-routed layer.

[NOTE] Where a model fits the GPU, plain PEFT on the GPU is an order of magnitude faster than the
CPU engine: then every layer keeps its experts in transformers' own expert path (PEFT's own
expert LoRA, nothing staged). Where it fits only in part, every layer goes to the CPU engine and
also keeps an equal number of its experts on the GPU (`kt_trl.device_share`: the most-routed ones
after the first optimizer step), which compute their routes while the engine computes the others;
both devices work on every layer at once, instead of one after the other as a split by whole
layers would have them. Saving, resume, merging and `PeftModel.from_pretrained` see the same fused
parameters whatever the split.

`KTConfig(gpu_experts="auto")` keeps as many experts as fit in the accelerator's memory
(`KTConfig(max_gpu_memory_gb=...)` caps it) after what training needs besides them: the other
weights, the LoRA parameters with their gradients and AdamW state, and an activation estimate for
the micro-batch; an integer keeps that many experts (counted over the model); `"none"` keeps none.
Layers whose engine was installed beforehand (`weights.install_engine`) stay on the CPU engine.
"""

from __future__ import annotations

import logging
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


@dataclass(frozen=True)
class GPUBudget:
    """How the accelerator's memory was shared out (bytes).

    Attributes:
        capacity: Device memory considered (free memory, capped by `max_gpu_memory_gb`).
        reserved: What training needs besides the GPU-resident experts (weights, LoRA state,
            activations, margin).
        per_layer: One layer's routed experts with their LoRA state, in transformers' path.
        layers: How many layers' experts fit that way.
        per_expert: One expert as a share of a CPU-routed layer (its BF16 copy and LoRA rows).
        share_activations: The shares' working memory during one call.
        experts: How many experts fit as shares.
    """

    capacity: int
    reserved: int
    per_layer: int
    layers: int
    per_expert: int = 0
    share_activations: int = 0
    experts: int = 0


@dataclass(frozen=True)
class Placement:
    """Where the routed experts compute.

    Attributes:
        layers: Decoder-layer indices whose experts stay in transformers' path on the device.
        share: Experts of every other (CPU-routed) layer also kept on the device (0: none).
    """

    layers: frozenset = frozenset()
    share: int = 0


def expert_lora_params(block: MoEBlock) -> list[torch.Tensor]:
    """The LoRA A and B parameters of `block`'s expert `ParamWrapper`s."""
    return [p for w in block.wrappers for adapters in (w.lora_A, w.lora_B) for p in adapters.parameters()]


def _expert_layer_bytes(block: MoEBlock) -> int:
    frozen = nbytes(*block.experts.parameters(recurse=False))
    return frozen + TRAINABLE_BYTES * sum(p.numel() for p in expert_lora_params(block))


def _share_expert_bytes(block: MoEBlock) -> int:
    # BF16 copies of the expert's weights, its LoRA rows in FP32 and their gradients
    experts = block.experts
    weights = sum(p[0].numel() for p in (experts.gate_up_proj, experts.down_proj)) * 2
    return weights + 8 * sum(p.numel() for p in expert_lora_params(block)) // experts.gate_up_proj.shape[0]


def _share_activation_bytes(model: nn.Module, tokens: int) -> int:
    # The share's sorted copies of every route (x, gate|up, h, out, weighted) in its backward, with gradients
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, top_k = config.hidden_size, getattr(config, "num_experts_per_tok", 8)
    inter = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden)
    return tokens * top_k * (2 * hidden + 3 * inter) * 12


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
               device: torch.device) -> GPUBudget:
    """How many of `blocks`' layers, or of their experts as shares, fit on `device` next to the rest of training."""
    free, _ = torch.cuda.mem_get_info(device)
    capacity = free if config.max_gpu_memory_gb is None else min(free, int(config.max_gpu_memory_gb * 1e9))
    expert_params = {id(p) for b in blocks for p in b.experts.parameters(recurse=False)}
    lora_params = {id(p) for b in blocks for p in expert_lora_params(b)}
    others = [p for p in model.parameters() if id(p) not in expert_params and id(p) not in lora_params]
    reserved = (nbytes(*others) + TRAINABLE_BYTES * sum(p.numel() for p in others if p.requires_grad)
                + activation_bytes(model, tokens, checkpointed=checkpointed) + int(MARGIN_FRACTION * capacity) + MARGIN_BYTES)
    if not blocks:
        return GPUBudget(capacity, reserved, 1, 0)
    per_layer, per_expert = max(_expert_layer_bytes(blocks[0]), 1), max(_share_expert_bytes(blocks[0]), 1)
    share_activations = _share_activation_bytes(model, tokens)
    return GPUBudget(capacity, reserved, per_layer, max(0, (capacity - reserved) // per_layer), per_expert,
                     share_activations, max(0, (capacity - reserved - share_activations) // per_expert))


def placement(model: nn.Module, blocks: list[MoEBlock], config: KTConfig, *, tokens: int | None,
              checkpointed: bool | None, device) -> Placement:
    """Which experts of `blocks` stay on the training device.

    Args:
        model: The unwrapped model (on the CPU or the meta device, before placement).
        blocks: Its MoE blocks.
        config: `KTConfig` (`gpu_experts`, `max_gpu_memory_gb`).
        tokens: Tokens per micro-batch, for the activation estimate (None: 4096).
        checkpointed: Whether training uses gradient checkpointing (None: TRL's default, yes).
        device: The training device; `"auto"` keeps experts there only when it is a CUDA device.
    """
    free = [b for b in blocks if not hasattr(b.experts, "_kt_engine")]  # installed engines stay on the CPU
    if config.gpu_experts == "none" or not blocks:
        return Placement()
    experts = blocks[0].experts.gate_up_proj.shape[0]
    if config.gpu_experts == "auto":
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            return Placement()
        budget = gpu_budget(model, blocks, config, tokens=tokens or 4096, checkpointed=checkpointed is not False,
                            device=device)
        whole = free and len(free) == len(blocks) and budget.layers >= len(blocks)
        share = 0 if whole else min(budget.experts // len(blocks), experts)
        logger.info("kt_trl: %.1f GB of GPU memory, %.1f GB for the rest of training: %s.", budget.capacity / 1e9,
                    budget.reserved / 1e9, f"all {len(blocks)} MoE layers keep their experts on the GPU" if whole else
                    f"{share} of the {experts} experts of each of {len(blocks)} MoE layers also on the GPU "
                    f"({budget.per_expert / 1e6:.1f} MB each)")
    else:
        total = experts * len(blocks)
        whole = free and len(free) == len(blocks) and config.gpu_experts >= total
        share = 0 if whole else min(config.gpu_experts // len(blocks), experts)
        if not whole and config.gpu_experts % len(blocks):
            logger.warning("kt_trl: gpu_experts=%d over %d MoE layers keeps %d experts in each (%d in all).",
                           config.gpu_experts, len(blocks), share, share * len(blocks))
    if whole:
        return Placement(layers=frozenset(b.index for b in blocks))
    return Placement(share=share)
