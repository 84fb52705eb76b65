"""`KTConfig`: the settings kt_trl adds on top of `trl.SFTConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ._native.isa import ISA_CHOICES
from .formats import EXPERT_FORMATS


@dataclass(frozen=True)
class KTConfig:
    """Settings of the CPU expert engine and of how the trainer uses it.

    Everything else (batch size, learning rate, gradient checkpointing, ...) stays in `trl.SFTConfig`.

    Args:
        isa (`str`, *optional*):
            Instruction-set path of the native engine: `"auto"` picks the best the CPU supports
            (AMX-BF16 → AVX-512-BF16 → AVX2 → scalar); a named one is used or refused with an error,
            never silently replaced. Defaults to the `KT_TRL_ISA` environment variable, else `"auto"`.
        threads (`int`, *optional*):
            Worker threads of the engine. Defaults to `KT_TRL_THREADS`, else one per physical core.
        reuse_checkpointed_activations (`bool`, *optional*, defaults to `True`):
            With gradient checkpointing (TRL's default), keep what the expert backward needs from the
            first forward instead of running the CPU expert forward a second time during backward.
            Costs `T·k·2I` BF16 values per MoE layer of host RAM per micro-batch (at Qwen3-30B-A3B's
            shape and 8192 tokens, 0.2 GB per layer); set `False` to recompute instead.
        max_kept_activations_gb (`float`, *optional*):
            Host memory (GB, 1e9 bytes) those kept activations may take over the whole model; the
            layers forwarded after the budget is spent recompute their CPU expert forward. Defaults
            to no limit.
        max_kept_activations_gpu_gb (`float`, *optional*):
            When the model runs on a CUDA device, kept activations wait there first, up to this many
            GB over the whole model (host memory is the scarcer: the packed experts fill most of it);
            beyond it they go to host memory. Defaults to a quarter of the device's memory; `0` keeps
            them in host memory.
        gpu_experts (`str` or `int`, *optional*, defaults to `"auto"`):
            Routed experts that stay on the accelerator, in transformers' own expert path (whole
            layers; `kt_trl.placement`). `"auto"`: as many layers as fit next to the rest of
            training when the model trains on a CUDA device, none on a CPU-only run; an `int`: that
            many experts counted over the model, rounded down to whole layers (on a CPU-only run
            they compute through torch on the CPU); `"none"`: every routed expert on the CPU engine.
        max_gpu_memory_gb (`float`, *optional*):
            Accelerator memory (GB) `gpu_experts="auto"` may plan with; defaults to what is free.
        torch_threads (`int`, *optional*):
            Torch's intra-op threads during `train()`. Defaults to 1 when the model trains on the CPU
            (torch's pool and the engine's share its cores, and a multi-threaded torch pool stalls
            whenever a core is busy: `kt_trl.cpu_threads`), unless `OMP_NUM_THREADS` is set; on an
            accelerator torch's setting is left alone.
        freeze_experts (`bool`, *optional*, defaults to `False`):
            The engine holds the routed experts' base weights frozen. A model whose expert weights
            still require gradients (no PEFT, full fine-tuning) is refused unless this is `True`, in
            which case they are frozen and everything else trains.
        max_pending_activations (`int`, *optional*, defaults to `8`):
            Per MoE layer, how many first-forward activations may wait for their recomputation
            (micro-batches forwarded before one backward). Older ones are dropped with a warning.
        expert_format (`str`, *optional*, defaults to `"auto"`):
            How the CPU engine stores the frozen routed experts (`kt_trl.formats`): `"bf16"`;
            `"fp8"` (E4M3 with FP32 scales: an FP8 checkpoint's own codes and block scales, or
            quantized from BF16 with one scale per row and 128 values); `"int8"` (one scale per
            row, quantized at load). The 8-bit ones take half the host memory of BF16 and train
            exactly as the BF16 engine would on their dequantized weights. `"auto"` keeps an FP8
            checkpoint's experts in FP8 when `kt_trl.load_model` streams them, BF16 otherwise.

    Example:

    ```python
    >>> from kt_trl import KTConfig
    >>> KTConfig(isa="avx2", threads=2)
    KTConfig(isa='avx2', threads=2, reuse_checkpointed_activations=True, max_kept_activations_gb=None, max_kept_activations_gpu_gb=None, gpu_experts='auto', max_gpu_memory_gb=None, torch_threads=None, freeze_experts=False, max_pending_activations=8, expert_format='auto')
    >>> KTConfig().isa is None  # KT_TRL_ISA or "auto"
    True
    ```
    """

    isa: str | None = None
    threads: int | None = None
    reuse_checkpointed_activations: bool = True
    max_kept_activations_gb: float | None = None
    max_kept_activations_gpu_gb: float | None = None
    gpu_experts: str | int = "auto"
    max_gpu_memory_gb: float | None = None
    torch_threads: int | None = None
    freeze_experts: bool = False
    max_pending_activations: int = 8
    expert_format: str = "auto"

    def __post_init__(self) -> None:
        if self.isa is not None and self.isa not in ISA_CHOICES:
            raise ValueError(f"KTConfig(isa={self.isa!r}) is not one of {ISA_CHOICES}; use 'auto' to let the engine pick.")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"KTConfig(threads={self.threads!r}) must be a positive int, or None for one per physical core.")
        if self.torch_threads is not None and (not isinstance(self.torch_threads, int) or self.torch_threads < 1):
            raise ValueError(f"KTConfig(torch_threads={self.torch_threads!r}) must be a positive int, or None for the default.")
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(f"KTConfig(expert_format={self.expert_format!r}) is not one of {EXPERT_FORMATS}.")
        if self.max_pending_activations < 1:
            raise ValueError("KTConfig(max_pending_activations=...) must be >= 1.")
        gpu = self.gpu_experts
        if not (gpu in ("auto", "none") or (isinstance(gpu, int) and not isinstance(gpu, bool) and gpu >= 0)):
            raise ValueError(f"KTConfig(gpu_experts={gpu!r}) must be 'auto', 'none' or a number of experts >= 0.")
        for name in ("max_kept_activations_gb", "max_kept_activations_gpu_gb", "max_gpu_memory_gb"):
            gb = getattr(self, name)
            if gb is not None and not gb >= 0:
                raise ValueError(f"KTConfig({name}={gb!r}) must be >= 0 GB, or None for the default.")

    @property
    def kept_activations_limit_bytes(self) -> int | None:
        """`max_kept_activations_gb` in bytes (None: no limit)."""
        gb = self.max_kept_activations_gb
        return None if gb is None else int(gb * 1e9)

    @property
    def kept_activations_gpu_limit_bytes(self) -> int | None:
        """`max_kept_activations_gpu_gb` in bytes (None: a quarter of the device's memory)."""
        gb = self.max_kept_activations_gpu_gb
        return None if gb is None else int(gb * 1e9)
