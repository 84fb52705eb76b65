"""The torch-facing engine of one MoE layer's routed experts (packed frozen weights on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._native import ensure_configured, ops


@dataclass(frozen=True)
class ExpertLoRA:
    """LoRA factors of one projection for all experts, ``p_e(x) += scale * (x A_e^T) B_e^T``.

    Args:
        A (`torch.Tensor`): ``[E, r, in]`` float32, contiguous (PEFT: ``lora_A.weight.view(E, r, in)``).
        B (`torch.Tensor`): ``[E, out, r]`` float32, any strides
            (PEFT: ``lora_B.weight.view(out, r, E).permute(2, 0, 1)``).
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


def _as_cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=dtype)


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

    The weights are converted to bfloat16 and packed expert by expert; the caller may free its
    tensors afterwards.

    Example:
        >>> engine = ExpertEngine(torch.randn(4, 64, 32), torch.randn(4, 32, 32))
        >>> y, saved = engine.forward(torch.randn(5, 32).bfloat16(), torch.randint(0, 4, (5, 2)), torch.rand(5, 2))
    """

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, *, activation: str = "silu", alpha: float = 1.702,
                 limit: float = 7.0, gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None):
        if gate_up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"gate_up must be [E, 2I, H] and down [E, H, I], got {list(gate_up.shape)} and {list(down.shape)}")
        E, two_i, H = gate_up.shape
        if two_i % 2 or tuple(down.shape) != (E, H, two_i // 2):
            raise ValueError(f"down must be [E, H, I] = [{E}, {H}, {two_i // 2}] for gate_up {list(gate_up.shape)}, "
                             f"got {list(down.shape)}")
        self._allocate(E, H, two_i // 2)
        ops.experts_set_activation(self._handle, activation, alpha, limit)
        for e in range(E):
            self.load_expert(e, gate_up[e], down[e])
        if (gate_up_bias is None) != (down_bias is None):
            raise ValueError("give both gate_up_bias [E, 2I] and down_bias [E, H], or neither")
        if gate_up_bias is not None:
            for e in range(E):
                self.load_bias(e, gate_up_bias[e], down_bias[e])

    @classmethod
    def from_experts(cls, num_experts: int, hidden_size: int, intermediate_size: int, experts, *,
                     activation: str = "silu", alpha: float = 1.702, limit: float = 7.0) -> "ExpertEngine":
        """Builds an engine expert by expert, never holding the whole layer in another copy.

        Args:
            experts (`Iterable[tuple]`): ``(gate_up [2I, H], down [H, I])`` for expert 0, 1, ... (any
                float dtype, CPU, unit column stride for no copy), or with the expert's biases
                ``(gate_up, down, gate_up_bias [2I], down_bias [H])``.
            activation, alpha, limit: as for the constructor.
        """
        engine = cls.__new__(cls)
        engine._allocate(num_experts, hidden_size, intermediate_size)
        ops.experts_set_activation(engine._handle, activation, alpha, limit)
        count = 0
        for e, weights in enumerate(experts):
            if e >= num_experts:
                raise ValueError(f"more than num_experts={num_experts} experts were given")
            engine.load_expert(e, weights[0], weights[1])
            if len(weights) == 4:
                engine.load_bias(e, weights[2], weights[3])
            count += 1
        if count != num_experts:
            raise ValueError(f"{count} experts were given, expected num_experts={num_experts}")
        return engine

    def _allocate(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        ensure_configured()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self._handle = ops.experts_create(num_experts, hidden_size, intermediate_size)

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.num_experts, self.hidden_size, self.intermediate_size

    @property
    def packed_bytes(self) -> int:
        return ops.experts_packed_bytes(self._handle)

    def load_expert(self, expert: int, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        """(Re)packs one expert from ``gate_up [2I, H]`` and ``down [H, I]``."""
        gu = gate_up if gate_up.dtype == torch.bfloat16 and gate_up.stride(-1) == 1 else _as_cpu(gate_up, torch.bfloat16)
        dn = down if down.dtype == torch.bfloat16 and down.stride(-1) == 1 else _as_cpu(down, torch.bfloat16)
        ops.experts_load(self._handle, expert, gu, dn, self.hidden_size, self.intermediate_size)

    def load_bias(self, expert: int, gate_up_bias: torch.Tensor, down_bias: torch.Tensor) -> None:
        """Frozen biases of one expert: ``gate_up_bias [2I]`` (gate then up), ``down_bias [H]``."""
        ops.experts_load_bias(self._handle, expert, _as_cpu(gate_up_bias, torch.float32).contiguous(),
                              _as_cpu(down_bias, torch.float32).contiguous(), self.hidden_size,
                              self.intermediate_size)

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weights back in the HF layout: ``gate_up [E, 2I, H]``, ``down [E, H, I]`` (bf16)."""
        parts = [ops.experts_unpack(self._handle, e, self.hidden_size, self.intermediate_size)
                 for e in range(self.num_experts)]
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    def forward(self, x, top_k_index, top_k_weights, *, lora_gate_up: ExpertLoRA | None = None,
                lora_down: ExpertLoRA | None = None, save: bool = True, empty=None):
        """``(y [T, H] bf16, ExpertActivations)``. ``x`` bf16 ``[T, H]`` on the CPU.

        ``empty(shape, dtype)``, if given, allocates ``y`` (e.g. in pinned memory); it defaults
        to the engine's cached host memory, where the activations always go.
        """
        ids, weights = _routing_to_cpu(top_k_index, top_k_weights)
        y, saved = ops.experts_forward(self._handle, self.dims, x, ids, weights, lora_gate_up, lora_down, save,
                                       empty=empty or ops.host_empty)
        return y, ExpertActivations(*saved)

    def backward(self, grad_output, x, top_k_index, top_k_weights, saved: ExpertActivations, *,
                 lora_gate_up: ExpertLoRA | None = None, lora_down: ExpertLoRA | None = None,
                 need_dx: bool = True, need_dw: bool = True, need_lora_grads: bool = True, empty=None):
        """``(dx bf16 | None, dw float32 | None, (dA_gu, dB_gu) | None, (dA_d, dB_d) | None)``.

        LoRA gradients are new tensors with the shapes and strides of the given A and B (None for
        a projection without LoRA, or with ``need_lora_grads=False``). ``empty`` allocates dx and
        dw as in `forward`.
        """
        ids, weights = _routing_to_cpu(top_k_index, top_k_weights)
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
    ids = ids.detach().to("cpu")
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    weights = weights.detach().to("cpu")
    if weights.dtype not in (torch.float32, torch.bfloat16):
        weights = weights.float()
    return ids.contiguous(), weights.contiguous()


def _grad_buffers(lora: ExpertLoRA | None):
    # Plain torch memory, not the engine's cache: these usually become the parameters' `.grad`
    # and die at `zero_grad()`, after which cached blocks of their sizes would sit idle through
    # the next forward, when host memory peaks.
    if lora is None:
        return None
    return torch.empty(lora.A.shape), torch.empty_strided(lora.B.shape, lora.B.stride())
