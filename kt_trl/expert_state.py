"""Expert weights in `state_dict()` / `load_state_dict()` of a prepared model.

After preparation the engine holds the only copy of a layer's frozen expert weights; the module keeps
zero-byte placeholders (`experts.release_expert_weights`). Without help, a full `save_pretrained`
would write zeros and `load_state_dict` would fail on the placeholders. Three per-instance hooks fix
that:

- `state_dict`: the engine's weights (unpacked to BF16, the values it computes with) replace the
  placeholders. Only for models that are not `PeftModel`s: a PEFT save keeps adapter keys alone,
  so unpacking every expert at every checkpoint would only cost host RAM.
- `load_state_dict` (pre): incoming `gate_up_proj` / `down_proj` (in the family's layout) are packed
  into the engine expert by expert and taken out of the state dict ...
- `load_state_dict` (post): ... and out of the missing keys, so `strict=True` still holds; biases
  (gpt-oss), which stay ordinary frozen parameters, are copied into the engine.
"""

from __future__ import annotations

import torch
from torch import nn

from .expert_layouts import ExpertLayout
from .expert_weights import engine_bias, engine_expert, hf_expert

NAMES = ("gate_up_proj", "down_proj")


def _state_dict_hook(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    gate_up, down = module._kt_experts.engine.unpack()
    layout = module._kt_layout
    if layout.transposed or layout.interleaved:   # back to the family's layout, expert by expert
        experts = [hf_expert(layout, gate_up[e], down[e]) for e in range(gate_up.shape[0])]
        gate_up, down = torch.stack([g for g, _ in experts]), torch.stack([d for _, d in experts])
    for name, tensor in zip(NAMES, (gate_up, down)):
        key = prefix + name
        if key in state_dict:
            state_dict[key] = tensor.to(state_dict[key].dtype)


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    keys = [prefix + name for name in NAMES]
    present = [key in state_dict for key in keys]
    if not any(present):
        return
    if not all(present):
        error_msgs.append(f"{prefix[:-1]}: kt_trl repacks experts from gate_up_proj and down_proj together; got only one.")
        return
    gate_up, down = state_dict.pop(keys[0]), state_dict.pop(keys[1])
    engine = module._kt_experts.engine
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
        engine = module._kt_experts.engine
        for expert in range(engine.num_experts):
            engine.load_bias(expert, *engine_bias(layout, module, expert))
    loaded = getattr(module, "_kt_loaded_keys", set())
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in loaded]
    module._kt_loaded_keys = set()


def attach_state_hooks(experts: nn.Module, layout: ExpertLayout, *, unpack_on_save: bool) -> None:
    """Register the hooks on a prepared experts module (carrying `_kt_experts`) of the family `layout`."""
    experts._kt_layout = layout
    if unpack_on_save:
        experts.register_state_dict_post_hook(_state_dict_hook)
    experts.register_load_state_dict_pre_hook(_load_pre_hook)
    experts.register_load_state_dict_post_hook(_load_post_hook)
