"""Finding the transformers model and its MoE blocks inside whatever wraps them.

Wrappers seen in practice: `PeftModel` (`get_base_model()`), DDP / FSDP / DataParallel
(`.module`), `torch.compile` (`._orig_mod`), old trl value-head models (`.pretrained_model`); PEFT's
`ParamWrapper`s nest around a fused experts module through `.base_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .layouts import ExpertLayout


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a PEFT `PeftModel` (duck-typed: no peft import needed)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap_model(model: nn.Module, *, keep_peft: bool = False) -> nn.Module:
    """Return the transformers model inside PEFT, DDP/FSDP, `torch.compile` and value-head wrappers
    (with `keep_peft`, the first `PeftModel` met instead)."""
    for _ in range(16):  # wrappers nest a few levels at most; a bound keeps a cycle from hanging
        if is_peft_model(model):
            if keep_peft:
                return model
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif isinstance(getattr(model, "pretrained_model", None), nn.Module):
            model = model.pretrained_model
        else:
            return model
    raise ValueError(f"Could not unwrap {type(model).__name__}: more than 16 nested wrappers.")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of an unwrapped transformers causal LM.

    `get_decoder().layers` where it exists; `model.model.layers` otherwise (Llama4's `get_decoder()`
    returns the CausalLM itself).
    """
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    layers = getattr(decoder, "layers", None) if decoder is not None and decoder is not model else None
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"Could not find the decoder layers of {type(model).__name__}: neither get_decoder().layers nor "
            "model.model.layers is an nn.ModuleList. Pass a transformers *ForCausalLM model."
        )
    return layers


def param_wrappers(module: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """Split PEFT `ParamWrapper`s off a fused experts module.

    Returns:
        `(base, wrappers)` with `wrappers` ordered outer → inner (for expert LoRA: down_proj, then
        gate_up_proj).
    """
    wrappers = []
    while isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "parameter_name"):
        wrappers.append(module)
        module = module.base_layer
    return module, wrappers


@dataclass
class MoEBlock:
    """One decoder layer's MoE block.

    Attributes:
        index: Decoder layer index.
        layer: The decoder layer (a `GradientCheckpointingLayer`).
        block: The MoE block (`layer.mlp`, Granite: `layer.block_sparse_moe`).
        slot: `block.experts` as found: the experts module or PEFT's outermost `ParamWrapper`.
        experts: The fused experts module itself.
        wrappers: PEFT `ParamWrapper`s around it, outer → inner.
    """

    index: int
    layer: nn.Module
    block: nn.Module
    slot: nn.Module
    experts: nn.Module
    wrappers: list[nn.Module] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"layers.{self.index}.{type(self.block).__name__}.experts"


def find_moe_blocks(layers: nn.ModuleList, layout: ExpertLayout) -> list[MoEBlock]:
    """The MoE blocks of `layers` (dense layers, e.g. DeepSeek's first ones, are skipped)."""
    blocks = []
    for index, layer in enumerate(layers):
        block = getattr(layer, layout.block_attr, None)
        slot = getattr(block, "experts", None) if block is not None else None
        if not isinstance(slot, nn.Module):
            continue
        experts, wrappers = param_wrappers(slot)
        blocks.append(MoEBlock(index, layer, block, slot, experts, wrappers))
    return blocks
