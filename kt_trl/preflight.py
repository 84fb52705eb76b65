"""`plan`: what a model, batch and LoRA will take of host and GPU memory, from the config alone.

[NOTE] Everything here is counted from the config: the model is built on the meta device for its
parameter shapes, no weight is read. Host memory holds the routed experts packed in their engine
format (`KTConfig.expert_format`: BF16, or 8-bit codes and FP32 scales; the bytes the native library
reports for those sizes, `ExpertEngine.weight_bytes`), the expert LoRA in FP32 with its gradient and
AdamW's two moments (4 × params × 4 bytes), and, under gradient checkpointing with reuse, what
each MoE layer keeps from the first forward for its backward, per micro-batch of
T = per_device_train_batch_size × max_length tokens: the routing ids, the output `[T, H]`, the
`[T·k, 2I]` BF16 gate/up pre-activations and the LoRA intermediates `[T·k, r]` FP32 per projection
(`kt_trl.checkpointing`), in GPU memory first up to `KTConfig.max_kept_activations_gpu_gb` when
there is a GPU. The layers `KTConfig.gpu_experts` keeps in transformers' path on the training
device (`kt_trl.placement`: the choice `load_model` and `prepare_model` make) are counted there
instead: their experts in the model's dtype and their expert LoRA state. The GPU holds everything
else: the non-expert weights in the model's dtype, their LoRA (FP32, gradient, AdamW) and activations, estimated roughly (each layer's checkpointed input,
one layer's working set of about a dozen `[T, H]` tensors, FP32 logits and their gradient). Without
a GPU all of that is host memory too.
"""

from __future__ import annotations

import logging
import os

import re
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint_formats import fp8_block_k, fp8_codes_fit
from .checkpoint_keys import fp8_block_size
from .checkpointing import checkpointing_requested
from .config import KTConfig
from .containers import find_decoder_layers, find_moe_blocks
from .engine import ExpertEngine
from .formats import FP8_BLOCK_K
from .layouts import EXPERT_PARAMETERS, engine_dims, match_layout
from .lora import requested_expert_lora
from .mxfp4 import is_mxfp4
from .placement import Unprepared, gpu_layers, training_device

__all__ = ["Plan", "plan"]

logger = logging.getLogger(__name__)

GB = 1e9
_TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "experts_per_token")


_PACKED = "routed experts, packed"


@dataclass(frozen=True)
class Plan:
    """The memory `kt_trl.plan` expects a training run to take, in bytes, against what the machine has.

    Attributes:
        model: Name or path (or the config's `model_type`).
        family: Registry family of the routed experts.
        shape: `(moe_layers, E, H, I, top_k)` of the routed experts.
        tokens: Tokens per micro-batch `T` (0 without training arguments).
        lora_rank: LoRA rank counted (0 without a PEFT config).
        host: `(what, bytes)` per line of host memory.
        gpu: `(what, bytes)` per line of GPU memory (empty without a GPU: then everything is in `host`).
        host_available: `psutil.virtual_memory().available`.
        gpu_available: Free memory of the current CUDA device (`None` without one).
        gpu_layers: Decoder-layer indices whose experts `KTConfig.gpu_experts` keeps in
            transformers' path on the training device (`kt_trl.placement`): counted there, not in
            the packed experts.
    """

    model: str
    family: str
    shape: tuple[int, int, int, int, int]
    tokens: int
    lora_rank: int
    host: tuple[tuple[str, int], ...]
    gpu: tuple[tuple[str, int], ...]
    host_available: int
    gpu_available: int | None
    gpu_layers: tuple[int, ...] = ()

    @property
    def host_bytes(self) -> int:
        return sum(n for _, n in self.host)

    @property
    def gpu_bytes(self) -> int:
        return sum(n for _, n in self.gpu)

    @property
    def host_fits(self) -> bool:
        return self.host_bytes <= self.host_available

    @property
    def gpu_fits(self) -> bool | None:
        """Whether the (rough) GPU estimate fits; `None` without a GPU."""
        return None if self.gpu_available is None else self.gpu_bytes <= self.gpu_available

    def __str__(self) -> str:
        layers, E, H, I, k = self.shape
        tokens = f", T = {self.tokens:,} tokens per micro-batch" if self.tokens else ""
        split = (f"; {len(self.gpu_layers)} of them keep their experts on the training device"
                 if self.gpu_layers else "")
        lines = [f"kt_trl plan: {self.model} ({self.family}), {layers} MoE layers x E {E}, H {H}, I {I}, "
                 f"top-{k}{tokens}{split}"]
        for title, rows, available, fits in (("host", self.host, self.host_available, self.host_fits),
                                             ("GPU", self.gpu, self.gpu_available, self.gpu_fits)):
            if available is None:
                continue
            lines.append(f"  {title + ' memory':<44}{'GB':>9}")
            lines += [f"    {what:<42}{n / GB:>9.2f}" for what, n in rows]
            total = sum(n for _, n in rows)
            lines.append(f"    {'total / available':<42}{total / GB:>9.2f} / {available / GB:.2f}  "
                         f"{'fits' if fits else 'DOES NOT FIT'}")
        return "\n".join(lines)

    def check(self) -> None:
        """Raise `ValueError` naming what to change when host memory cannot hold the run.

        The GPU estimate is rough: a GPU that looks too small is only logged.
        """
        if self.gpu_fits is False:
            logger.warning(
                "kt_trl plan: the GPU estimate (%.1f GB, rough) exceeds the free %.1f GB; lower the batch size or "
                "max_length if training runs out of GPU memory.", self.gpu_bytes / GB, self.gpu_available / GB)
        if self.host_fits:
            return
        rows = dict(self.host)
        excess = self.host_bytes - self.host_available
        fixes = []
        kept = rows.get("kept activations (checkpointing)", 0)
        if kept or rows.get("activations (rough)", 0):
            cap = max(0.0, (kept - excess) / GB)
            fixes.append(f"lower per_device_train_batch_size or max_length (T = {self.tokens:,})"
                         + (f", or cap the kept activations with KTConfig(max_kept_activations_gb={cap:.1f})"
                            if kept else ""))
        lora = next((n for what, n in self.host if what.startswith("expert LoRA")), 0)
        if lora:
            fixes.append(f"a smaller LoRA rank than r={self.lora_rank} (expert LoRA takes {lora / GB:.1f} GB)")
        packed_row, packed = next(((w, n) for w, n in self.host if w.startswith(_PACKED)), (_PACKED, 0))
        if packed_row.endswith("BF16"):
            fixes.append(f"8-bit experts, KTConfig(expert_format='fp8') or 'int8' (about {packed / 2 / GB:.1f} GB "
                         "instead of the BF16 ones)")
        fixes.append("a smaller model (or a host with more memory)")
        raise ValueError(
            f"kt_trl plan: {self.model} needs {self.host_bytes / GB:.1f} GB of host memory, {excess / GB:.1f} GB more "
            f"than the {self.host_available / GB:.1f} GB available ({packed_row}: {packed / GB:.1f} GB). "
            f"Change one of: {'; '.join(fixes)}.\n{self}"
        )


def plan(name_or_path_or_config, args=None, kt_config: KTConfig | None = None, *, peft_config=None,
         dtype: torch.dtype | str | None = None) -> Plan:
    """Host and GPU memory a training run of a MoE model will take, from its config alone.

    Nothing is loaded: the model is built on the meta device from the config for its shapes.
    `kt_trl.load_model` and `KTSFTTrainer("name or path", ...)` run `plan(...).check()` first.

    Args:
        name_or_path_or_config (`str`, `os.PathLike` or `PretrainedConfig`):
            A checkpoint directory or Hub id (only its `config.json` is read), or a config.
        args (`trl.SFTConfig`, *optional*):
            Batch size, `max_length` and gradient checkpointing; without it activations are not counted.
        kt_config (`KTConfig`, *optional*):
            Whether and where checkpointed activations are kept (`reuse_checkpointed_activations`,
            `max_kept_activations_gb`, `max_kept_activations_gpu_gb`).
        peft_config (`peft.LoraConfig`, *optional*):
            The LoRA: its rank, and whether it reaches the experts (`target_parameters`, `"all-linear"`).
        dtype (`torch.dtype` or `str`, *optional*):
            The non-expert weights' dtype; defaults to `args.model_init_kwargs["dtype"]` (trl's
            default float32) with `args`, else the config's dtype.

    Returns:
        `Plan`: printable as a short table; `check()` raises when host memory cannot fit.

    Example:

    ```python
    >>> from transformers import Qwen3MoeConfig
    >>> from kt_trl import plan
    >>> p = plan(Qwen3MoeConfig(num_hidden_layers=2, num_experts=8, moe_intermediate_size=64))
    >>> p.host_bytes > 0, p.shape[:2]
    (True, (2, 8))
    >>> print(p)  # doctest: +SKIP
    ```
    """
    config = _config_of(name_or_path_or_config)
    kt_config = kt_config or KTConfig()
    meta, layout, blocks = _meta_model(config)
    experts = [block.experts for block in blocks]
    layers, E, H, I = len(experts), *engine_dims(layout, experts[0])
    top_k = _top_k(config)
    tokens = _tokens(args)
    device = training_device(args)
    cuda = device.type == "cuda"   # else all of it is host memory
    weight_bytes = _dtype_of(dtype, args, config).itemsize
    expert_ids = {id(p) for module in experts for p in module.parameters()}
    other = sum(p.numel() for p in meta.parameters() if id(p) not in expert_ids)
    r = int(getattr(peft_config, "r", 0) or 0) if peft_config is not None else 0
    lora_factors = _expert_lora_factors(peft_config, E, H, I) if r else 0   # r·E·(in + out) per layer, / r
    other_lora = _gpu_lora_params(peft_config, meta, r)
    # the layers load_model / prepare_model keep in transformers' path on the training device
    device_layers = tuple(sorted(gpu_layers(
        meta, blocks, kt_config, tokens=tokens or None, checkpointed=checkpointing_requested(args),
        device=device, unprepared=Unprepared(weight_bytes, other_lora, r * lora_factors))))
    on_device = len(device_layers)
    engine_layers = layers - on_device
    kept = _kept_bytes(args, kt_config, tokens, top_k, H, I, r if lora_factors else 0, engine_layers)
    kept_gpu = min(kept, _gpu_kept_budget(kt_config)) if cuda else 0
    host_limit = kt_config.kept_activations_limit_bytes
    kept_host = kept - kept_gpu if host_limit is None else min(kept - kept_gpu, host_limit)
    format, block_k = _planned_format(kt_config, config, layout)
    host = [(f"{_PACKED} {format.upper()}", engine_layers * ExpertEngine.weight_bytes(E, H, I, format, block_k)),
            (f"expert LoRA r{r} (+ grad, AdamW; FP32)", 16 * r * engine_layers * lora_factors),
            ("kept activations (checkpointing)", kept_host)]
    rest = [(f"other weights ({weight_bytes} bytes each)", other * weight_bytes),
            (f"other LoRA r{r} (+ grad, AdamW; FP32)", 16 * other_lora),
            (f"routed experts of {on_device} layer(s) in transformers' path", on_device * E * 3 * H * I * weight_bytes),
            (f"their expert LoRA r{r} (+ grad, AdamW; FP32)", 16 * r * on_device * lora_factors),
            ("activations (rough)", _activation_bytes(args, tokens, config, H) + kept_gpu)]
    name = str(name_or_path_or_config) if isinstance(name_or_path_or_config, (str, os.PathLike)) else config.model_type
    return Plan(
        model=name, family=layout.family, shape=(layers, E, H, I, top_k), tokens=tokens, lora_rank=r,
        host=tuple((w, int(n)) for w, n in host + ([] if cuda else rest) if n),
        gpu=tuple((w, int(n)) for w, n in rest if n) if cuda else (),
        host_available=int(_host_available()), gpu_available=int(torch.cuda.mem_get_info(device)[0]) if cuda else None,
        gpu_layers=device_layers,
    )


def _config_of(source):
    if isinstance(source, (str, os.PathLike)):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(source))
    if not hasattr(source, "model_type"):
        raise TypeError(f"plan() takes a checkpoint name, directory or transformers config, not "
                        f"{type(source).__name__}.")
    return source


def _meta_model(config) -> tuple[nn.Module, object, list]:
    """The model on the meta device (an FP8 config without its quantization: shapes are the same)."""
    import copy

    from transformers import AutoModelForCausalLM

    if getattr(config, "quantization_config", None) is not None:
        config = copy.deepcopy(config)
        delattr(config, "quantization_config")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layout = match_layout(meta)   # refuses dense and unknown families, listing the supported ones
    blocks = find_moe_blocks(find_decoder_layers(meta), layout)
    if not blocks:
        raise ValueError(f"{layout.family}: the config makes no layer a MoE layer; nothing for the CPU engine.")
    return meta, layout, blocks


def _top_k(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = next((getattr(text, key) for key in _TOP_K_KEYS if getattr(text, key, None) is not None), 1)
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _tokens(args) -> int:
    if args is None:
        return 0
    length = getattr(args, "max_length", None) or getattr(args, "max_seq_length", None) or 1024
    return int(args.per_device_train_batch_size) * int(length)


def _dtype_of(dtype, args, config) -> torch.dtype:
    if dtype is None and args is not None:
        dtype = (getattr(args, "model_init_kwargs", None) or {}).get("dtype", "float32")   # trl's default
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _planned_format(kt_config: KTConfig, config, layout) -> tuple[str, int]:
    """`(format, block_k)` the engine will store the experts in (`kt_trl.checkpoint_formats` for "auto")."""
    quantization = getattr(config, "quantization_config", None)
    fp8 = quantization is not None and not is_mxfp4(quantization)   # MXFP4 is dequantized as read
    block = fp8_block_size(quantization) if fp8 else None
    fp8_checkpoint = fp8 and fp8_codes_fit(block, layout)
    format = kt_config.expert_format
    if format == "auto":
        format = "fp8" if fp8_checkpoint else "bf16"
    if format == "fp8":
        return format, fp8_block_k(block) if fp8_checkpoint else FP8_BLOCK_K
    return format, 0


def _expert_lora_factors(peft_config, E: int, H: int, I: int) -> int:
    """Expert-LoRA parameters per MoE layer divided by r: `E·(H + 2I)` on gate_up, `E·(I + H)` on down."""
    if not requested_expert_lora(peft_config):
        return 0
    named = {str(p).rsplit(".", 1)[-1] for p in getattr(peft_config, "target_parameters", None) or ()}
    targets = named & set(EXPERT_PARAMETERS) or set(EXPERT_PARAMETERS)   # "all-linear": both
    return E * (("gate_up_proj" in targets) * (H + 2 * I) + ("down_proj" in targets) * (I + H))


def _kept_bytes(args, kt_config: KTConfig, T: int, k: int, H: int, I: int, r: int, layers: int) -> int:
    """What the MoE layers keep from the first forward for their backward, over all layers, one micro-batch."""
    if not T or not checkpointing_requested(args) or not kt_config.reuse_checkpointed_activations:
        return 0
    return layers * (T * k * 8 + T * H * 2 + T * k * 2 * I * 2 + T * k * 2 * r * 4)


def _gpu_kept_budget(kt_config: KTConfig) -> int:
    limit = kt_config.kept_activations_gpu_limit_bytes
    return limit if limit is not None else torch.cuda.mem_get_info()[1] // 4


def _gpu_lora_params(peft_config, meta: nn.Module, r: int) -> int:
    """LoRA parameters on ordinary linear layers PEFT's `target_modules` reaches (not the experts)."""
    targets = getattr(peft_config, "target_modules", None) if peft_config is not None else None
    if not r or not targets:
        return 0
    output = meta.get_output_embeddings()
    total = 0
    for name, module in meta.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if isinstance(targets, str):
            hit = targets == "all-linear" or re.fullmatch(targets, name) is not None
        else:
            hit = name.rsplit(".", 1)[-1] in set(targets)
        total += hit * r * (module.in_features + module.out_features)
    return total


def _activation_bytes(args, T: int, config, H: int) -> int:
    """Rough: each layer's checkpointed input (about a dozen `[T, H]` tensors without checkpointing),
    one layer's working set, FP32 logits and their gradient."""
    if not T:
        return 0
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    per_layer = T * H * 2 * (1 if checkpointing_requested(args) else 12)
    return text.num_hidden_layers * per_layer + 12 * T * H * 2 + 2 * T * text.vocab_size * 4


def _host_available() -> int:
    import psutil

    return psutil.virtual_memory().available
