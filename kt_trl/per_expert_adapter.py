"""Expert LoRA saved per expert, under the checkpoint's module names: the layout serving engines load.

[NOTE] PEFT keeps LoRA on a fused 3-D expert parameter `[E, out, in]` (`target_parameters`) as one
`A [E*r, in]` and one `B [out, r*E]` (`kt_trl.lora` spells the layout out), and saves it that way: PEFT loads it back, but
vLLM and SGLang load expert LoRA per expert, under the names the experts have in the model's
checkpoint files (`...experts.{e}.gate_proj`, Mixtral's `...experts.{e}.w1`, ...). Those names
and the gate/up split are family-specific, so they are not hard-coded here: transformers' own
checkpoint conversion is run backwards (`revert_weight_conversion`, what `save_pretrained` does)
on a probe whose values are the fused row indices (`checkpoint_keys.checkpoint_rows`, which the
loader shares). Each per-expert tensor it returns says which expert and which output rows it
holds; that module gets `A_e` and the rows of `B_e`, with the wrapper's scaling folded into `B`
relative to the adapter's default `lora_alpha / r`. The other LoRA modules (attention, a
router's) keep their tensors, under their checkpoint names too.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import torch
from torch import nn

from .checkpoint_keys import checkpoint_rows
from .containers import is_peft_model, unwrap_model
from .progress import with_progress

__all__ = ["save_per_expert_adapter"]

_PEFT_PREFIX = "base_model.model."


def save_per_expert_adapter(model, output_dir: str | Path, adapter_name: str = "default", *,
                            base_model: str | Path | None = None) -> Path:
    """Save a PEFT adapter with its fused-expert LoRA split into per-expert LoRA modules.

    Args:
        model: The trained `PeftModel` (or `KTSFTTrainer` / any trainer holding it, or a DDP / compile
            wrapper around it), or the directory of an adapter saved by `save_model` /
            `save_pretrained`. A directory is converted without loading any weight of the base
            model: its architecture is built on the meta device from its config alone.
        output_dir: Directory for `adapter_config.json` and `adapter_model.safetensors`.
        adapter_name: Which adapter of the model to save (in-memory models).
        base_model: For an adapter directory, the base model's name or directory (only its
            `config.json` is read). Defaults to the adapter's `base_model_name_or_path`.

    Returns:
        The output directory.

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    >>> peft_model = get_peft_model(model, LoraConfig(r=4, target_parameters=experts))  # e.g. trainer.model
    >>> peft_model.save_pretrained("out")                       # PEFT's layout, for PeftModel.from_pretrained
    >>> save_per_expert_adapter(peft_model, "out/per_expert")   # per expert, for vLLM / SGLang
    PosixPath('out/per_expert')
    ```
    """
    from safetensors.torch import save_file

    if isinstance(model, (str, Path)):
        peft_model, state = _saved_adapter(Path(model), base_model)
        adapter_name = "default"
    else:
        from peft import get_peft_model_state_dict

        peft_model = _find_peft_model(model)
        if adapter_name not in peft_model.peft_config:
            raise ValueError(f"The model has no adapter {adapter_name!r}; it has {sorted(peft_model.peft_config)}.")
        state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    config = peft_model.peft_config[adapter_name]
    base = unwrap_model(peft_model)
    default_scale = _scaling(config.lora_alpha, config.r, config.use_rslora)

    rank_pattern, alpha_pattern, split_params = dict(config.rank_pattern or {}), dict(config.alpha_pattern or {}), set()
    split = {}  # the per-expert LoRA, already under checkpoint names
    wrappers = [(name, wrapper, getattr(wrapper.get_base_layer(), wrapper.parameter_name))
                for name, wrapper in peft_model.named_modules()
                if type(wrapper).__name__ == "ParamWrapper" and adapter_name in wrapper.lora_A]
    # A 2-D parameter (a router's weight) is an ordinary LoRA module already.
    wrappers = [(name, wrapper, param) for name, wrapper, param in wrappers if param.dim() == 3]
    for name, wrapper, param in with_progress(wrappers, desc="Splitting expert LoRA per expert", unit="matrix"):
        experts_path = re.sub(r"(\.base_layer)+$", "", name.removeprefix(_PEFT_PREFIX))
        A, B = (state.pop(f"{name}.{kind}.weight").detach() for kind in ("lora_A", "lora_B"))
        modules = _per_expert_modules(base, f"{experts_path}.{wrapper.parameter_name}", param.shape)
        r = wrapper.r[adapter_name]
        E, out = param.shape[0], param.shape[1]
        A, B = A.reshape(E, r, -1), B.reshape(out, r, E) * (wrapper.scaling[adapter_name] / default_scale)
        for module, (e, rows) in modules.items():
            split[f"{_PEFT_PREFIX}{module}.lora_A.weight"] = A[e].contiguous().clone()
            split[f"{_PEFT_PREFIX}{module}.lora_B.weight"] = B[rows, :, e].contiguous()
        split_params.add(wrapper.parameter_name)
        if r != config.r:  # this rank differs from the default: PEFT needs it said, at the default scaling
            for pattern in {_any_expert(module, e) for module, (e, _) in modules.items()}:
                rank_pattern[pattern] = r
                alpha_pattern[pattern] = default_scale * (math.sqrt(r) if config.use_rslora else r)

    if not split_params:
        raise ValueError(
            "This adapter has no LoRA on fused 3-D expert parameters (PEFT `target_parameters`): it is already "
            "per module; save it with `save_pretrained`."
        )
    state = {**_checkpoint_names(base, state), **split}
    out_config = copy.deepcopy(config)
    out_config.target_parameters = [p for p in (config.target_parameters or [])
                                    if p.rsplit(".", 1)[-1] not in split_params] or None
    out_config.target_modules = sorted({key.removesuffix(".lora_A.weight").rsplit(".", 1)[-1]
                                        for key in state if key.endswith(".lora_A.weight")})
    out_config.rank_pattern, out_config.alpha_pattern = rank_pattern, alpha_pattern
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    out_config.save_pretrained(str(output_dir))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(output_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return output_dir


def _checkpoint_names(base: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename LoRA modules the way transformers renames their weights on save (Mixtral's router is
    `mlp.gate` in the model, `block_sparse_moe.gate` in its checkpoints)."""
    from transformers.core_model_loading import revert_weight_conversion

    renamed, cache = {}, {}
    for key, value in state.items():
        match = re.fullmatch(rf"{re.escape(_PEFT_PREFIX)}(.+)\.(lora_[AB]\.weight)", key)
        if match:
            module, kind = match.groups()
            if module not in cache:
                saved = list(revert_weight_conversion(base, {f"{module}.weight": torch.zeros(2, 2)}))
                one = len(saved) == 1 and saved[0].endswith(".weight")
                cache[module] = saved[0].removesuffix(".weight") if one else module
            key = f"{_PEFT_PREFIX}{cache[module]}.{kind}"
        renamed[key] = value
    return renamed


def _saved_adapter(adapter_dir: Path, base_model) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A saved adapter's tensors, and its PEFT model rebuilt on the meta device for names and shapes."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import load_peft_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json: pass a PEFT model or a saved adapter directory.")
    config = LoraConfig.from_pretrained(str(adapter_dir))
    base_model = base_model or config.base_model_name_or_path
    if not base_model:
        raise ValueError(f"{adapter_dir}/adapter_config.json names no base model: pass base_model=<name or directory>.")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(base_model)))
    return get_peft_model(skeleton, config), load_peft_weights(str(adapter_dir), device="cpu")


def _find_peft_model(model) -> nn.Module:
    """The `PeftModel` in `model`, a trainer holding it, or DDP / compile wrappers around it."""
    model = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    inner = unwrap_model(model, keep_peft=True) if isinstance(model, nn.Module) else model
    if not is_peft_model(inner):
        raise ValueError(f"Expected a PEFT model (or a trainer holding one), got {type(model).__name__}.")
    return inner


def _any_expert(module: str, expert: int) -> str:
    """A regex of `module` (a per-expert name) with its expert index left open: one pattern per projection."""
    head, _, tail = module.rpartition(f".{expert}.")
    return re.escape(head) + r"\.\d+\." + re.escape(tail)


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _per_expert_modules(base: nn.Module, fused_key: str, shape) -> dict[str, tuple[int, torch.Tensor]]:
    """Checkpoint module name -> (expert, rows of the fused output dim) for one fused parameter."""
    found = checkpoint_rows(base, fused_key, shape)
    if any(entry.expert is None or not key.endswith(".weight") for key, entry in found.items()):
        raise ValueError(
            f"{type(base).__name__}'s checkpoints do not store {fused_key} as one weight per expert "
            f"(transformers saves it as {sorted(found)[:3]}...): its expert LoRA cannot be split per "
            "expert; serve it with the adapter `save_pretrained` writes."
        )
    return {key.removesuffix(".weight"): (entry.expert, entry.rows) for key, entry in found.items()}
