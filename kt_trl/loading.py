"""`load_model`: a checkpoint's routed experts streamed from its safetensors files into CPU engines.

[NOTE] `from_pretrained` fuses a checkpoint's per-expert tensors into `gate_up_proj [E, 2I, H]` /
`down_proj [E, H, I]`: the whole expert set in memory once more before kt_trl packs it. Here
(checked on transformers 5.24):

1. the model is built on the meta device, and each checkpoint key of an expert is mapped to its
   fused parameter, expert and rows (`checkpoint_keys`);
2. `from_pretrained(None, config=..., state_dict=sd)` loads everything else the usual way
   (renamings, tied weights, buffers, missing keys initialised): `sd` holds lazy safetensors
   slices of the non-expert keys and, under each fused expert name, a zero-stride placeholder
   `torch.zeros((), dtype).expand(shape)` that becomes the parameter without being allocated;
3. `del model._weight_conversions`: that load recorded only the renamings it used, with which
   `save_pretrained` would write fused experts; without it transformers falls back to the
   family's mapping and saves per-expert keys again;
4. the experts are streamed layer by layer into engines (`expert_streaming`), except those of the
   layers `KTConfig.gpu_experts` keeps on the training device (the plan's choice, `placement`): those
   are read straight into their fused parameters there.

FP8 checkpoints (DeepSeek-V3 / Kimi-K2: `float8_e4m3fn` weights, one FP32 `weight_scale_inv` per
block): non-expert weights are dequantized tensor by tensor as they are read, to the model's dtype
(the product transformers' own dequantization computes); experts keep their codes and scales in the
engine, or are dequantized for another `KTConfig.expert_format` (`checkpoint_formats`). gpt-oss's
MXFP4 experts are dequantized expert by expert as read (`kt_trl.mxfp4`).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint_formats import streamed_format
from .checkpoint_keys import LayerSources, Shards, checkpoint_files, fp8_block_size, layer_sources, unplaced_expert_keys
from .config import KTConfig
from .containers import find_decoder_layers, find_moe_blocks
from .expert_streaming import stream_experts, stream_to_device
from .layouts import ExpertLayout, match_layout
from .mxfp4 import is_mxfp4
from .placement import training_device

logger = logging.getLogger(__name__)

__all__ = ["load_model"]

HUB_KWARGS = ("revision", "cache_dir", "token", "force_download", "local_files_only", "proxies", "subfolder",
              "trust_remote_code")
MODEL_KWARGS = ("attn_implementation", "experts_implementation", "use_kernels", "kernel_config")
REFUSED_KWARGS = {
    "device_map": "the routed experts stay in the CPU engine and the Trainer (or `.to(device)`) places the rest",
    "quantization_config": "load_model reads BF16 / FP16 / FP32, FP8 and MXFP4 checkpoints as they are stored",
    "state_dict": "load_model builds the state dict itself", "gguf_file": "load_model reads safetensors only",
    "key_mapping": "experts are found by transformers' own conversion mapping",
    "variant": "load_model reads model.safetensors[.index.json]", "tp_plan": "tensor parallelism is not supported",
    "output_loading_info": "load_model returns the model only",
}
SNAPSHOT_PATTERNS = (  # configs, weights, tokenizer files
    "*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")


def load_model(name_or_path: str | os.PathLike, *, kt_config: KTConfig | None = None, args=None, peft_config=None,
               **from_pretrained_kwargs) -> nn.Module:
    """Load a MoE checkpoint with its routed experts streamed straight into kt_trl's CPU engines.

    The result is what `prepare_model` leaves after packing, without the detour through a fused
    copy of the experts: each layer's experts are read from the safetensors shards one expert at
    a time into an `ExpertEngine` (installed with `kt_trl.weights.install_engine`), everything else
    loads through transformers as usual. `KTSFTTrainer` / `prepare_model` then route the model.
    `kt_trl.plan(...).check()` runs first, before any weight is read, and its table is logged; the
    layers it keeps on the training device (`KTConfig.gpu_experts`, e.g. as many as fit a GPU) are
    read into their fused parameters there instead, FP8 dequantized on the device.

    Args:
        name_or_path (`str` or `os.PathLike`):
            A local checkpoint directory (`model.safetensors` or a sharded
            `model.safetensors.index.json`) or a Hugging Face Hub id (configs, safetensors and
            tokenizer files are downloaded with `huggingface_hub.snapshot_download`). FP8
            checkpoints in DeepSeek's block layout keep their experts' codes in the engine
            (`KTConfig.expert_format="auto"`); gpt-oss's MXFP4 ones are dequantized as read.
        kt_config (`KTConfig`, *optional*):
            Engine settings (ISA and threads are applied before packing), `gpu_experts` /
            `max_gpu_memory_gb` (which layers stay on the training device) and the kept-activation
            budget the plan counts.
        args (`trl.SFTConfig`, *optional*):
            Training settings the plan counts (batch size, `max_length`, gradient checkpointing) and
            the training device (`args.device`; without args, this process's CUDA device if any).
        peft_config (`peft.LoraConfig`, *optional*):
            The LoRA the plan counts (its rank, and whether it reaches the experts).
        **from_pretrained_kwargs:
            As for `from_pretrained`: `dtype` (defaults to `"auto"`), `attn_implementation`,
            `revision`, `token`, `trust_remote_code`, config overrides, ... `device_map`,
            `quantization_config`, `state_dict`, `gguf_file`, `key_mapping`, `variant` are refused.

    Returns:
        `PreTrainedModel`: on the CPU, in eval mode like `from_pretrained`'s, its experts in engines,
        but for the planned GPU layers' experts, already on the training device.

    Example:

    ```python
    >>> import torch
    >>> from kt_trl import load_model
    >>> model.save_pretrained("checkpoint")               # stands in for a Hub id such as "Qwen/Qwen3-30B-A3B"
    >>> model = load_model("checkpoint", dtype=torch.bfloat16)
    >>> model.model.layers[0].mlp.experts.gate_up_proj.stride()   # a placeholder: the experts are in the engine
    (0, 0, 0)
    ```
    """
    from transformers import AutoConfig

    from .preflight import plan

    kwargs = _checked_kwargs(from_pretrained_kwargs)
    hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "auto"))
    model_kwargs = {key: kwargs.pop(key) for key in MODEL_KWARGS if key in kwargs}
    # A Hub id's configs come first, alone: the plan may refuse before any weight is downloaded.
    trust = {"trust_remote_code": hub["trust_remote_code"]} if "trust_remote_code" in hub else {}
    config = AutoConfig.from_pretrained(str(_local_directory(name_or_path, hub, weights=False)), **trust,
                                        **kwargs)  # the rest of the keywords: config overrides, as in from_pretrained
    preflight = plan(config, args=args, kt_config=kt_config, peft_config=peft_config, dtype=dtype)
    logger.info("kt_trl: preflight plan for %s\n%s", name_or_path, preflight)
    preflight.check()
    if kt_config is not None:  # before packing: a forced ISA the CPU lacks fails before any read
        from ._native import configure

        configure(isa=kt_config.isa, threads=kt_config.threads)
    directory = _local_directory(name_or_path, hub, weights=True)
    start = time.perf_counter()
    model = _load(directory, config, dtype, model_kwargs, hub.get("trust_remote_code", False),
                  kt_config.expert_format if kt_config is not None else "auto",
                  on_device=(preflight.gpu_layers, training_device(args)))
    model.config._name_or_path = str(name_or_path)  # what trl reads to find the tokenizer, PEFT to name the base
    logger.info("kt_trl: loaded %s in %.1f s", name_or_path, time.perf_counter() - start)
    return model


def model_init_kwargs(args) -> dict:
    """The `from_pretrained` keywords trl's `SFTTrainer` uses for a model given by name: a copy of
    `args.model_init_kwargs`, `dtype` defaulting to float32 and `trust_remote_code` to the args'."""
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    dtype = kwargs.get("dtype", "float32")
    kwargs["dtype"] = getattr(torch, dtype) if dtype in ("bfloat16", "float16", "float32") else dtype
    kwargs.setdefault("trust_remote_code", getattr(args, "trust_remote_code", False))
    return kwargs


def _checked_kwargs(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if kwargs.get("device_map") in (None, "cpu", torch.device("cpu")):
        kwargs.pop("device_map", None)
    for key, why in REFUSED_KWARGS.items():
        if kwargs.get(key) not in (None, False):
            raise ValueError(
                f"load_model does not take {key}= ({why}). Drop it, or load with "
                "AutoModelForCausalLM.from_pretrained and pass the model to KTSFTTrainer (which packs its experts)."
            )
    return kwargs


def _local_directory(name_or_path, hub: dict, *, weights: bool) -> Path:
    """A local checkpoint directory as given, or a Hub snapshot of its configs (and, with `weights`,
    its safetensors and tokenizer files)."""
    subfolder = hub.get("subfolder") or ""
    if Path(name_or_path).is_dir():
        return Path(name_or_path) / subfolder
    from huggingface_hub import snapshot_download

    patterns = [*(SNAPSHOT_PATTERNS if weights else ("*.json",)), *(("*.py",) if hub.get("trust_remote_code") else ())]
    patterns = [f"{subfolder}/{p}" if subfolder else p for p in patterns]
    download = {key: hub[key] for key in ("revision", "cache_dir", "token", "force_download", "local_files_only",
                                          "proxies") if key in hub}
    return Path(snapshot_download(str(name_or_path), allow_patterns=patterns, **download)) / subfolder


def _load(directory: Path, config, dtype, model_kwargs: dict, trust_remote_code: bool, expert_format: str, *,
          on_device: tuple[tuple[int, ...], torch.device]) -> nn.Module:
    """The model with non-expert weights loaded by transformers and experts streamed into engines, but those
    of the decoder layers `on_device` names, read onto its device."""
    from transformers import AutoModelForCausalLM

    config, fp8 = _without_fp8(config)
    dtype = _resolved_dtype(dtype, config, directory)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    layout = match_layout(meta)  # refuses dense and unknown families, listing the supported ones
    blocks = find_moe_blocks(find_decoder_layers(meta), layout)
    layers = layer_sources(meta, blocks)
    shards = Shards(checkpoint_files(directory), **fp8)
    _check_keys(shards, layers)
    indices, device = on_device
    dense = [layer for block, layer in zip(blocks, layers) if block.index in indices]
    packed_layers = [layer for block, layer in zip(blocks, layers) if block.index not in indices]
    engine_format = streamed_format(expert_format, shards, layout, [key for layer in packed_layers for key in layer.keys]
                                    ) if packed_layers else None
    state_dict = _lazy_state_dict(shards, layers, meta, dtype)
    model = type(meta).from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype, **model_kwargs)
    del state_dict, meta
    # This load used no expert converter, so `_weight_conversions` lists only renamings: saving with it would
    # write the experts fused. Without it `save_pretrained` reverts the family's full mapping (per-expert keys).
    model.__dict__.pop("_weight_conversions", None)
    _load_generation_config(model, directory)
    shards.release_all()  # non-expert reads are done; expert shards reopen as needed
    if dense:
        start = time.perf_counter()
        placed = stream_to_device(model, dense, shards, dtype, device, later=packed_layers)
        logger.info("kt_trl: read the routed experts of %d layer(s) onto %s: %.2f GB in %.1f s", len(dense), device,
                    placed / 1e9, time.perf_counter() - start)
    if packed_layers:
        start = time.perf_counter()
        packed = stream_experts(model, packed_layers, shards, layout, dtype, engine_format)
        seconds = time.perf_counter() - start
        logger.info("kt_trl: streamed the routed experts of %d layers into the CPU engine: %.2f GB packed in %.1f s "
                    "(%.2f GB/s)", len(packed_layers), packed / 1e9, seconds, packed / 1e9 / max(seconds, 1e-9))
    return model


def _without_fp8(config) -> tuple[object, dict]:
    """The config without its FP8 or MXFP4 `quantization_config` (weights are dequantized as read, and the
    model is a BF16 one from then on, saved as such), and the `Shards` settings of its format."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return config, {}
    settings = {"mxfp4": True} if is_mxfp4(quantization) else {
        "fp8": True, "fp8_block": fp8_block_size(quantization)}  # refuses anything else
    config = copy.deepcopy(config)
    delattr(config, "quantization_config")
    return config, settings


def _resolved_dtype(dtype, config, directory: Path) -> torch.dtype:
    """`from_pretrained`'s dtype rule: "auto" is the config's dtype, else the checkpoint's first float dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.get_default_dtype()
    if dtype != "auto":
        if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise ValueError(f"dtype={dtype!r} is neither 'auto' nor a torch dtype name such as 'bfloat16'.")
        return getattr(torch, dtype)
    configured = getattr(config, "dtype", None)
    if configured is not None:
        return getattr(torch, configured) if isinstance(configured, str) else configured
    return Shards(checkpoint_files(directory)).float_dtype() or torch.get_default_dtype()


def _check_keys(shards: Shards, layers: list[LayerSources]) -> None:
    """Every expert tensor the model needs is in the checkpoint, and every expert tensor there has a place."""
    missing = sorted(set().union(*(layer.keys for layer in layers)) - set(shards.files)) if layers else []
    if missing:
        raise ValueError(
            f"The checkpoint lacks {len(missing)} expert tensor(s) the model's config asks for, e.g. {missing[:3]}: "
            "config.json and the weights do not match (number of experts or layers), or a shard is incomplete."
        )
    unplaced = unplaced_expert_keys(shards.files, layers)
    if unplaced:
        raise ValueError(
            f"kt_trl cannot place {len(unplaced)} expert tensor(s) of the checkpoint, e.g. {unplaced[:3]}: they fill "
            "no routed expert of the model its config.json describes (more experts, or MoE weights in a layer the "
            "config makes dense, or a naming transformers does not convert). Check config.json against the weights."
        )
    shards.check_dtypes()


def _lazy_state_dict(shards: Shards, layers: list[LayerSources], meta: nn.Module, dtype: torch.dtype) -> dict:
    """Lazy views of the non-expert tensors, and zero-stride placeholders under the fused expert names."""
    experts = set().union(*(layer.keys for layer in layers)) if layers else set()
    state_dict = {key: shards.lazy(key) for key in shards.files if key not in experts and not shards.is_scale(key)}
    for layer in layers:
        for name in layer.names:
            # A stride-0 view of one element: from_pretrained installs it as the parameter as it is.
            state_dict[name] = torch.zeros((), dtype=dtype).expand(meta.get_parameter(name).shape)
    return state_dict


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """`from_pretrained(None, ...)` reads no generation_config.json; the directory's, when it has one."""
    if (directory / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(directory))
