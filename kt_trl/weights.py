"""A layer's frozen expert weights in and out of the engine.

After preparation the engine holds the only copy of a layer's frozen expert weights, packed; the
Hugging Face module keeps zero-byte placeholders of the same shapes (`release_expert_weights`), so
PEFT (which reads the shapes), parameter counts and `state_dict` keys keep working, and writes fail
loudly (they are zero-stride). This module moves weights across that line:

- in: `pack_experts` (from the module's own parameters, expert by expert) or `install_engine`
  (an engine built elsewhere, for weights that never exist as one Hugging Face tensor);
- out and back in through `state_dict()` / `load_state_dict()`, by three per-instance hooks:
  - `state_dict`: the engine's weights (unpacked to BF16, the values it computes with) replace
    the placeholders, one layer at a time. Not when the state dict is a `PeftModel`'s (keys under
    `base_model.model.`): PEFT keeps only the adapter keys of it, so unpacking every expert at every
    checkpoint would only cost host RAM. The model `unload()` / `merge_and_unload()` return is
    no `PeftModel`: it saves its experts (merged ones included).
  - `load_state_dict` (pre): incoming `gate_up_proj` / `down_proj` (in the family's layout) are
    packed into the engine expert by expert and taken out of the state dict ...
  - `load_state_dict` (post): ... and out of the missing keys, so `strict=True` still holds;
    biases (gpt-oss), which stay ordinary frozen parameters, are copied into the engine.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .engine import ExpertEngine
from .layouts import (EXPERT_PARAMETERS, ExpertLayout, engine_activation, engine_bias, engine_dims, engine_expert,
                      engine_experts, hf_experts)


def pack_experts(experts: nn.Module, layout: ExpertLayout, format: str = "bf16", *, memory=None,
                 filled: bool = False) -> ExpertEngine:
    """An `ExpertEngine` holding the module's experts (and biases) in `layout`, built expert by expert
    and stored in `format` (`kt_trl.formats`: 8-bit ones are quantized from the module's weights);
    `memory` / `filled` as for `ExpertEngine.from_experts` (filled: only the biases are read)."""
    E, H, I = engine_dims(layout, experts)
    options = {"format": format, "memory": memory, "filled": filled, **engine_activation(layout, experts)}
    with torch.no_grad():
        weights = engine_experts(layout, experts) if not filled or layout.bias else None   # filled: biases only
        return ExpertEngine.from_experts(E, H, I, weights, **options)


def release_expert_weights(experts: nn.Module) -> None:
    """Replace the 3-D expert parameters by zero-byte placeholders of the same shape and dtype."""
    for name in EXPERT_PARAMETERS:
        param = getattr(experts, name)
        if getattr(param, "_kt_placeholder", False):
            continue
        placeholder = torch.zeros((), dtype=param.dtype, device="cpu").expand(param.shape)
        new = nn.Parameter(placeholder, requires_grad=False)
        new._kt_placeholder = True
        setattr(experts, name, new)


def _stay_on_cpu(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """`Module._apply` for a module whose tensors live in host memory: moves and casts pass it by."""
    return self


def keep_on_cpu(module: nn.Module) -> None:
    """Make `.to()/.cuda()/.half()` leave `module` (and everything under it) where it is."""
    if not getattr(module, "_kt_stays_on_cpu", False):
        module._apply = types.MethodType(_stay_on_cpu, module)
        module._kt_stays_on_cpu = True


def install_engine(experts: nn.Module, engine: ExpertEngine, layout: ExpertLayout | None = None) -> None:
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
        layout (`ExpertLayout`, *optional*):
            The family's layout (`kt_trl.layouts.match_layout`) when its parameters are not
            `[E, 2I, H]` / `[E, H, I]` (gpt-oss: transposed).

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from kt_trl.weights import install_engine
    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(config)   # no weight allocated
    >>> E, H, I = config.num_experts, config.hidden_size, config.moe_intermediate_size
    >>> for layer in model.model.layers:   # e.g. read from a checkpoint expert by expert
    ...     experts = ((torch.randn(2 * I, H), torch.randn(H, I)) for _ in range(E))
    ...     install_engine(layer.mlp.experts, ExpertEngine.from_experts(E, H, I, experts))
    >>> model = model.to_empty(device="cpu")   # "cuda" on a GPU: all but the experts; initialise it, then train
    ```
    """
    if hasattr(experts, "_kt_runner") or hasattr(experts, "base_layer"):
        raise ValueError(
            f"install_engine needs the bare experts module before PEFT wrapping and preparation; got "
            f"{type(experts).__name__} that is already {'prepared' if hasattr(experts, '_kt_runner') else 'wrapped'}. "
            "Install engines right after building the model."
        )
    gate_up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == down.dim() == 3):
        raise ValueError(f"{type(experts).__name__} has no 3-D gate_up_proj / down_proj parameters to replace.")
    transposed = layout is not None and layout.transposed
    expected = engine_dims(layout, experts) if layout is not None else (gate_up.shape[0], gate_up.shape[2],
                                                                       gate_up.shape[1] // 2)
    E, H, I = expected
    down_shape = (E, I, H) if transposed else (E, H, I)
    if tuple(down.shape) != down_shape or tuple(engine.dims) != expected:
        names = ("[E, H, 2I]", "[E, I, H]") if transposed else ("[E, 2I, H]", "[E, H, I]")
        raise ValueError(
            f"{type(experts).__name__} has gate_up_proj {list(gate_up.shape)} {names[0]} and down_proj "
            f"{list(down.shape)} {names[1]}, but the engine holds (E, H, I) = {tuple(engine.dims)}; build it with "
            f"ExpertEngine.from_experts({', '.join(map(str, expected))}, ...)."
        )
    release_expert_weights(experts)
    keep_on_cpu(experts)
    experts._kt_engine = engine


def take_installed_engine(experts: nn.Module) -> ExpertEngine | None:
    """The engine `install_engine` gave `experts`, handed over once; None if it has none."""
    engine = getattr(experts, "_kt_engine", None)
    if engine is not None:
        del experts._kt_engine
    return engine


PEFT_PREFIX = "base_model.model."


def _state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    if prefix.startswith(PEFT_PREFIX):
        return
    gate_up, down = hf_experts(module._kt_layout, *module._kt_runner.engine.unpack())
    for name, tensor in zip(EXPERT_PARAMETERS, (gate_up, down)):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = tensor.to(state_dict[key].dtype)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    keys = [prefix + name for name in EXPERT_PARAMETERS]
    present = [key in state_dict for key in keys]
    if not any(present):
        return
    if not all(present):
        error_msgs.append(f"{prefix[:-1]}: kt_trl repacks experts from gate_up_proj and down_proj together; got only one.")
        return
    gate_up, down = state_dict.pop(keys[0]), state_dict.pop(keys[1])
    engine = module._kt_runner.engine
    expected = tuple(module.gate_up_proj.shape)   # the placeholder keeps the family's shape
    if tuple(gate_up.shape) != expected:
        error_msgs.append(f"{keys[0]}: shape {tuple(gate_up.shape)}, the engine holds {expected}.")
        return
    with torch.no_grad():
        for expert in range(engine.num_experts):
            engine.load_expert(expert, *engine_expert(module._kt_layout, gate_up[expert], down[expert]))
    module._kt_loaded_keys = set(keys)


def _load_post_hook(module: nn.Module, incompatible_keys) -> None:
    layout = module._kt_layout
    if layout.bias:   # biases load into their (kept) parameters; the engine computes with its own copy
        engine = module._kt_runner.engine
        for expert in range(engine.num_experts):
            engine.load_bias(expert, *engine_bias(layout, module, expert))
    loaded = getattr(module, "_kt_loaded_keys", set())
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in loaded]
    module._kt_loaded_keys = set()


def attach_state_hooks(experts: nn.Module, layout: ExpertLayout) -> None:
    """Register the hooks on a prepared experts module (carrying `_kt_runner`) of the family `layout`."""
    experts._kt_layout = layout
    experts.register_state_dict_post_hook(_state_dict_hook)
    experts.register_load_state_dict_pre_hook(_load_pre_hook)
    experts.register_load_state_dict_post_hook(_load_post_hook)
