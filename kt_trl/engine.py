"""The torch-facing engine of one MoE layer's routed experts (packed frozen weights on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._native import ensure_configured, ops
from ._native.pointers import check_tensor, has_internal_overlap
from .formats import CODE_DTYPES, QuantizedWeight, default_block_k, quantize


@dataclass(frozen=True)
class ExpertLoRA:
    """LoRA factors of one projection for all experts, ``p_e(x) += scale * (x A_e^T) B_e^T``.

    Args:
        A (`torch.Tensor`): ``[E, r, in]`` float32, contiguous (PEFT: ``lora_A.weight.view(E, r, in)``).
        B (`torch.Tensor`): ``[E, out, r]`` float32, any strides
            (PEFT: ``lora_B.weight.view(out, r, E).permute(2, 0, 1)``); a layout whose elements
            overlap (an expanded view) is copied for each call, see `ExpertEngine.backward`.
        scale (`float`): ``alpha / r``.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[1]


@dataclass(frozen=True)
class ExpertActivations:
    """What a forward saves for its backward, in route order (route = t * k + j); caller-owned."""

    gate_up: torch.Tensor | None          # [T*k, 2I] bf16, pre-activation gate | up
    lora_gate_up: torch.Tensor | None     # [T*k, r_gate_up] float32, x A^T
    lora_down: torch.Tensor | None        # [T*k, r_down] float32, h A^T

    def as_tuple(self):
        return self.gate_up, self.lora_gate_up, self.lora_down


def _as_cpu(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t`` on the CPU in ``dtype``, in a layout the engine reads: unit last stride, distinct and
    aligned elements (copied only if needed)."""
    check_tensor(t, name)
    return _readable(t.detach().to(device="cpu", dtype=dtype))


def _readable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its last stride is not 1, its elements overlap or are misaligned."""
    if t.dim() and (t.stride(-1) != 1 or has_internal_overlap(t)) or t.data_ptr() % t.element_size():
        return t.clone(memory_format=torch.contiguous_format)
    return t


class ExpertEngine:
    """Packed frozen experts of one layer, computed by the native engine.

    Args:
        gate_up (`torch.Tensor`): ``[E, 2I, H]`` (gate rows, then up rows), any float dtype, CPU.
        down (`torch.Tensor`): ``[E, H, I]``.
        activation (`str`, *optional*, defaults to `"silu"`): ``"silu"`` (``silu(g) * u``) or
            ``"clamped_swiglu"`` (gpt-oss: ``(clamp(u, +-limit) + 1) * g' * sigmoid(alpha g')``,
            ``g' = min(g, limit)``).
        alpha, limit (`float`, *optional*): parameters of ``"clamped_swiglu"``.
        gate_up_bias (`torch.Tensor`, *optional*): ``[E, 2I]`` (gate then up), frozen.
        down_bias (`torch.Tensor`, *optional*): ``[E, H]``, frozen.
        format (`str`, *optional*, defaults to `"bf16"`): how the engine stores the frozen weights:
            ``"bf16"``, ``"fp8"`` (E4M3, one scale per row and `block_k` values) or ``"int8"`` (one
            scale per row); see `kt_trl.formats`. The 8-bit ones hold half the bytes and compute
            exactly what a BF16 engine computes on their dequantized weights.
        block_k (`int`, *optional*): values per scale along K for ``"fp8"`` (default 128; a multiple
            of 16) and ``"int8"`` (default 0: one per row).

    The weights are converted to the format and packed expert by expert; the caller may free its
    tensors afterwards.

    Example:
        >>> engine = ExpertEngine(torch.randn(4, 64, 32), torch.randn(4, 32, 32))
        >>> top_k_index = torch.rand(5, 4).argsort(dim=1)[:, :2]   # 2 distinct experts of 4 per token
        >>> y, saved = engine.forward(torch.randn(5, 32).bfloat16(), top_k_index, torch.rand(5, 2))
        >>> y.shape
        torch.Size([5, 32])
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, *, activation: str = "silu", alpha: float = 1.702,
                 limit: float = 7.0, gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, format: str = "bf16", block_k: int | None = None):
        check_tensor(gate_up, "gate_up")
        check_tensor(down, "down")
        if gate_up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"gate_up must be [E, 2I, H] and down [E, H, I], got {list(gate_up.shape)} and {list(down.shape)}")
        E, two_i, H = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
            raise ValueError(f"down must be [E, H, I] = [{E}, {H}, {two_i // 2}] for gate_up {list(gate_up.shape)}, "
                             f"got {list(down.shape)}")
        if (gate_up_bias is None) != (down_bias is None):
            raise ValueError("give both gate_up_bias [E, 2I] and down_bias [E, H], or neither")
        if gate_up_bias is not None:
            for bias, name, shape, dims in ((gate_up_bias, "gate_up_bias", (E, two_i), "[E, 2I]"),
                                            (down_bias, "down_bias", (E, H), "[E, H]")):
                check_tensor(bias, name)
                if tuple(bias.shape) != shape:
                    raise ValueError(f"{name} must have shape {list(shape)} {dims} for gate_up {list(gate_up.shape)}, "
                                     f"got {list(bias.shape)}")
        self._allocate(E, H, two_i // 2, format, block_k)
        self._set_activation(activation, alpha, limit)
        for e in range(E):
            self.load_expert(e, gate_up[e], down[e])
        if gate_up_bias is not None:
            for e in range(E):
                self.load_bias(e, gate_up_bias[e], down_bias[e])

    @classmethod
    def from_experts(cls, num_experts: int, hidden_size: int, intermediate_size: int, experts, *,
                     activation: str = "silu", alpha: float = 1.702, limit: float = 7.0, format: str = "bf16",
                     block_k: int | None = None, memory: torch.Tensor | None = None,
                     filled: bool = False) -> "ExpertEngine":
        """Builds an engine expert by expert, never holding the whole layer in another copy.

        Args:
            experts (`Iterable[tuple]`): ``(gate_up [2I, H], down [H, I])`` for expert 0, 1, ... (any
                float dtype, CPU, unit column stride for no copy; or two `QuantizedWeight`s of the
                engine's format), or with the expert's biases ``(gate_up, down, gate_up_bias [2I],
                down_bias [H])``.
            activation, alpha, limit, format, block_k: as for the constructor.
            memory (`torch.Tensor`, *optional*): uint8 CPU memory of `weight_bytes` bytes to pack into
                instead of the engine's own (e.g. a mapping several processes share; kept alive by the
                engine).
            filled (`bool`, *optional*): `memory` holds every expert already, packed by an engine of
                the same sizes and format; `experts` then gives only what is not in it (biases), or is None.
        """
        engine = cls.__new__(cls)
        engine._allocate(num_experts, hidden_size, intermediate_size, format, block_k, memory, filled)
        engine._set_activation(activation, alpha, limit)
        if filled:
            for e, weights in enumerate(experts or ()):
                if len(weights) == 4:
                    engine.load_bias(e, weights[2], weights[3])
            return engine
        count = 0
        for e, weights in enumerate(experts):
            if e >= num_experts:
                raise ValueError(f"more than num_experts={num_experts} experts were given")
            if len(weights) not in (2, 4):
                raise ValueError(f"expert {e} was given {len(weights)} tensors; give (gate_up, down) or "
                                 "(gate_up, down, gate_up_bias, down_bias)")
            engine.load_expert(e, weights[0], weights[1])
            if len(weights) == 4:
                engine.load_bias(e, weights[2], weights[3])
            count += 1
        if count != num_experts:
            raise ValueError(f"{count} experts were given, expected num_experts={num_experts}")
        return engine

    def _allocate(self, num_experts: int, hidden_size: int, intermediate_size: int, format: str,
                  block_k: int | None, memory: torch.Tensor | None = None, filled: bool = False) -> None:
        ensure_configured()
        if format not in ops.FORMAT_CONSTANTS:
            raise ValueError(f"format must be one of {sorted(ops.FORMAT_CONSTANTS)}, got {format!r}")
        block_k = default_block_k(format) if block_k is None else block_k
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.format, self.block_k = format, block_k
        self._handle = ops.experts_create(num_experts, hidden_size, intermediate_size, format, block_k, memory, filled)
        self._memory = memory   # outlives the handle's use of it
        self._biases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _set_activation(self, activation: str, alpha: float, limit: float) -> None:
        ops.experts_set_activation(self._handle, activation, alpha, limit)
        self._activation = {"activation": activation, "alpha": alpha, "limit": limit}

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.num_experts, self.hidden_size, self.intermediate_size

    @property
    def packed_bytes(self) -> int:
        return ops.experts_packed_bytes(self._handle)

    @property
    def shared(self) -> bool:
        """Whether the weights are in memory given from outside (`from_experts(memory=...)`), which
        other processes may read too."""
        return self._memory is not None

    @staticmethod
    def weight_bytes(num_experts: int, hidden_size: int, intermediate_size: int, format: str = "bf16",
                     block_k: int | None = None) -> int:
        """Bytes of the packed weights of an engine of these sizes and format."""
        block_k = default_block_k(format) if block_k is None else block_k
        return ops.experts_weight_bytes(num_experts, hidden_size, intermediate_size, format, block_k)

    def load_expert(self, expert: int, gate_up, down) -> None:
        """(Re)packs one expert from ``gate_up [2I, H]`` and ``down [H, I]``: tensors (rounded to BF16,
        then quantized for an 8-bit engine) or `QuantizedWeight`s of the engine's format."""
        quantized = [isinstance(w, QuantizedWeight) for w in (gate_up, down)]
        if self.format == "bf16":
            if any(quantized):
                raise TypeError("this engine stores BF16 weights; give gate_up and down as tensors (QuantizedWeight."
                                "dequantize() gives them), or build the engine with format='fp8' / 'int8'")
            ops.experts_load(self._handle, expert, _as_cpu(gate_up, torch.bfloat16, "gate_up"),
                             _as_cpu(down, torch.bfloat16, "down"), self.hidden_size, self.intermediate_size)
            return
        weights = []
        for w, is_q, name in zip((gate_up, down), quantized, ("gate_up", "down")):
            if not is_q:
                w = quantize(_as_cpu(w, torch.bfloat16, name), self.format, self.block_k)
            elif w.codes.dtype != CODE_DTYPES[self.format]:
                raise TypeError(f"{name} codes of expert {expert} are {w.codes.dtype}; this {self.format} engine takes "
                                f"{CODE_DTYPES[self.format]}")
            weights.append(QuantizedWeight(_readable(w.codes.detach().cpu()), w.scales.detach().cpu().float()
                                           .contiguous(), w.block_k))
        ops.experts_load_8bit(self._handle, expert, *weights, self.hidden_size, self.intermediate_size, self.block_k)

    def load_bias(self, expert: int, gate_up_bias: torch.Tensor, down_bias: torch.Tensor) -> None:
        """Frozen biases of one expert: ``gate_up_bias [2I]`` (gate then up), ``down_bias [H]``."""
        biases = _as_cpu(gate_up_bias, torch.float32, "gate_up_bias"), _as_cpu(down_bias, torch.float32, "down_bias")
        ops.experts_load_bias(self._handle, expert, *biases, self.hidden_size, self.intermediate_size)
        self._biases[expert] = tuple(b.clone() for b in biases)   # kept for as_bf16 (E x (2I + H) floats)

    def unpack_expert(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert's packed weights in the HF layout: ``gate_up [2I, H]``, ``down [H, I]`` (bf16; for an
        8-bit engine the dequantized values it computes with)."""
        return ops.experts_unpack(self._handle, expert, self.hidden_size, self.intermediate_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every expert as `unpack_expert` gives it: ``gate_up [E, 2I, H]``, ``down [E, H, I]``."""
        parts = [self.unpack_expert(e) for e in range(self.num_experts)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    def as_bf16(self) -> "ExpertEngine":
        """A BF16 engine in its own memory computing exactly what this one does: its (dequantized)
        weights, activation and biases, built expert by expert. For writing into the weights (merging
        an adapter), which 8-bit codes cannot hold and shared pages must not take."""
        E, H, I = self.dims
        experts = (self.unpack_expert(e) + self._biases.get(e, ()) for e in range(E))
        return ExpertEngine.from_experts(E, H, I, experts, **self._activation)

    def forward(self, x, top_k_index, top_k_weights, *, lora_gate_up: ExpertLoRA | None = None,
                lora_down: ExpertLoRA | None = None, save: bool = True, empty=None):
        """``(y [T, H] bf16, ExpertActivations)``. ``x`` bf16 ``[T, H]`` on the CPU.

        ``empty(shape, dtype)``, if given, allocates ``y`` (e.g. in pinned memory); it defaults
        to the engine's cached host memory, where the activations always go.
        """
        ids, weights = _routing_to_cpu(top_k_index, top_k_weights)
        lora_gate_up, lora_down = _engine_lora(lora_gate_up, "gate_up"), _engine_lora(lora_down, "down")
        y, saved = ops.experts_forward(self._handle, self.dims, x, ids, weights, lora_gate_up, lora_down, save,
                                       empty=empty or ops.host_empty)
        return y, ExpertActivations(*saved)

    def backward(self, grad_output, x, top_k_index, top_k_weights, saved: ExpertActivations, *,
                 lora_gate_up: ExpertLoRA | None = None, lora_down: ExpertLoRA | None = None,
                 need_dx: bool = True, need_dw: bool = True, need_lora_grads: bool = True, empty=None):
        """``(dx bf16 | None, dw float32 | None, (dA_gu, dB_gu) | None, (dA_d, dB_d) | None)``.

        LoRA gradients are new tensors with the shapes and strides of the given A and B (None for
        a projection without LoRA, or with ``need_lora_grads=False``); for a B whose elements
        overlap (an expanded view), dB is contiguous and holds each expert's gradient, which
        autograd sums over the expanded dims. ``empty`` allocates dx and dw as in `forward`.
        """
        if not isinstance(saved, ExpertActivations):
            raise TypeError(f"saved must be the ExpertActivations of the forward, got {type(saved).__name__}")
        ids, weights = _routing_to_cpu(top_k_index, top_k_weights)
        lora_gate_up, lora_down = _engine_lora(lora_gate_up, "gate_up"), _engine_lora(lora_down, "down")
        if need_lora_grads:
            g_gu, g_d = _grad_buffers(lora_gate_up), _grad_buffers(lora_down)
        else:
            g_gu = g_d = None
        dx, dw = ops.experts_backward(self._handle, self.dims, grad_output, x, ids, weights, saved.as_tuple(),
                                      lora_gate_up, lora_down, need_dx=need_dx, need_dw=need_dw,
                                      grads_gate_up=g_gu, grads_down=g_d, empty=empty or ops.host_empty)
        return dx, dw, g_gu, g_d


def _routing_to_cpu(ids: torch.Tensor, weights: torch.Tensor):
    """``top_k_index`` and ``top_k_weights`` as contiguous CPU tensors of dtypes the engine reads."""
    check_tensor(ids, "top_k_index")
    check_tensor(weights, "top_k_weights")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"top_k_index must hold integer expert ids (int64 or int32), got {ids.dtype}")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"top_k_weights must be a floating-point tensor (float32 or bfloat16), got {weights.dtype}")
    ids = ids.detach().to("cpu")
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    weights = weights.detach().to("cpu")
    if weights.dtype not in (torch.float32, torch.bfloat16):
        weights = weights.float()
    return _readable(ids.contiguous()), _readable(weights.contiguous())


def _engine_lora(lora: ExpertLoRA | None, name: str) -> ExpertLoRA | None:
    """``lora`` with B copied if its elements overlap (an expanded view: to a contiguous layout) or
    are misaligned.

    The engine writes dB with B's strides: through overlapping ones, experts would overwrite each
    other's gradients (and autograd would then sum the survivor over the expanded dims).
    """
    if lora is None:
        return None
    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora_{name} must be an ExpertLoRA(A, B, scale), got {type(lora).__name__}")
    check_tensor(lora.B, f"{name} LoRA B")
    if has_internal_overlap(lora.B) or lora.B.data_ptr() % lora.B.element_size():
        return ExpertLoRA(lora.A, lora.B.detach().clone(memory_format=torch.contiguous_format), lora.scale)
    return lora


def _grad_buffers(lora: ExpertLoRA | None):
    # Plain torch memory, not the engine's cache: these usually become the parameters' `.grad`
    # and die at `zero_grad()`, after which cached blocks of their sizes would sit idle through
    # the next forward, when host memory peaks.
    if lora is None:
        return None
    return torch.empty(lora.A.shape), torch.empty_strided(lora.B.shape, lora.B.stride())
