"""Storage formats of the frozen expert weights in the engine: BF16, or 8-bit codes with FP32 scales.

An 8-bit weight ``W [N, K]`` is ``codes [N, K]`` and ``scales [N, ceil(K / block_k)]`` (one scale per
row and block of ``block_k`` values along K; ``block_k = 0``: one per row), and the engine computes
with ``bf16(value(code) * scale)`` (one FP32 product, rounded once): exactly `QuantizedWeight.dequantize`.

- ``"fp8"``: FP8 E4M3 codes (``torch.float8_e4m3fn``). DeepSeek-V3 / Kimi-K2 / Qwen3-FP8 checkpoints
  store them with one ``weight_scale_inv`` per 128 x 128 block: their rows of scales, repeated over
  each block's rows (`rows_of_block_scales`), are kept as they are. From BF16 weights, `quantize_fp8`
  picks one scale per row and 128 values.
- ``"int8"``: symmetric INT8 per output row (`quantize_int8`), from BF16 weights at load.

Both read half the bytes of BF16 per weight; the kernels decode them to BF16 in cache (W8A16).

Example:

```python
>>> import torch
>>> from kt_trl.engine import ExpertEngine
>>> from kt_trl.formats import quantize_int8
>>> w = torch.randn(64, 256)
>>> q = quantize_int8(w)                              # codes [64, 256] int8, one scale per row
>>> q.codes.dtype, tuple(q.scales.shape)
(torch.int8, (64, 1))
>>> bool((q.dequantize().float() - w).norm() < 0.01 * w.norm())
True
>>> gate_up, down = torch.randn(4, 512, 256), torch.randn(4, 256, 256)   # E = 4, H = 256, I = 256
>>> int8 = ExpertEngine(gate_up, down, format="int8")
>>> round(int8.packed_bytes / ExpertEngine(gate_up, down).packed_bytes, 2)   # codes + one FP32 scale per row
0.51
```
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXPERT_FORMATS = ("auto", "bf16", "fp8", "int8")
CODE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
FP8_BLOCK_K = 128   # K values per scale when kt_trl quantizes to FP8 (DeepSeek's block width)
_FP8_MAX = 448.0


@dataclass(frozen=True)
class QuantizedWeight:
    """One 8-bit weight: ``codes [N, K]`` (float8_e4m3fn or int8), ``scales [N, ceil(K / block_k)]``
    float32 (one column for ``block_k = 0``)."""

    codes: torch.Tensor
    scales: torch.Tensor
    block_k: int = 0

    @property
    def format(self) -> str:
        for name, dtype in CODE_DTYPES.items():
            if self.codes.dtype == dtype:
                return name
        raise TypeError(f"codes must be float8_e4m3fn or int8, got {self.codes.dtype}")

    def dequantize(self) -> torch.Tensor:
        """``W`` in BF16, the values the engine computes with."""
        K = self.codes.shape[-1]
        scales = self.scales if self.block_k == 0 else self.scales.repeat_interleave(self.block_k, dim=-1)[..., :K]
        return (self.codes.float() * scales.float()).bfloat16()


def scale_blocks(K: int, block_k: int) -> int:
    """Scales per row of a weight with K values along K: one per `block_k` of them (0: one per row)."""
    return 1 if block_k == 0 else -(-K // block_k)


def default_block_k(format: str) -> int:
    """K values per scale when none is given: 128 for FP8 (DeepSeek's block width), one per row otherwise."""
    return FP8_BLOCK_K if format == "fp8" else 0


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-row INT8: ``scale = max |row| / 127`` (1 for an all-zero row)."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=-1, keepdim=True)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(w / scales).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(codes, scales.contiguous(), 0)


def quantize_fp8(weight: torch.Tensor, block_k: int = FP8_BLOCK_K) -> QuantizedWeight:
    """FP8 E4M3 with one scale per row and `block_k` values: ``scale = max |block| / 448``."""
    w = weight.detach().float()
    N, K = w.shape
    nkb = scale_blocks(K, block_k)
    padded = torch.nn.functional.pad(w, (0, nkb * block_k - K)).view(N, nkb, block_k)
    amax = padded.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / _FP8_MAX, torch.ones_like(amax))
    codes = (padded / scales.unsqueeze(-1)).clamp_(-_FP8_MAX, _FP8_MAX).view(N, nkb * block_k)[:, :K]
    codes = codes.to(torch.float8_e4m3fn)
    return QuantizedWeight(codes.contiguous(), scales.contiguous(), block_k)


def quantize(weight: torch.Tensor, format: str, block_k: int) -> QuantizedWeight:
    """`weight` in an 8-bit `format` (``block_k`` as the engine's: per-row for int8)."""
    if format == "int8":
        return quantize_int8(weight)
    return quantize_fp8(weight, block_k)


def rows_of_block_scales(scale_inv: torch.Tensor, rows: int, block_rows: int) -> torch.Tensor:
    """DeepSeek's ``weight_scale_inv [ceil(R / b0), ceil(C / b1)]`` as one row of scales per weight
    row: ``[R, ceil(C / b1)]``."""
    return scale_inv.float().repeat_interleave(block_rows, dim=0)[:rows].contiguous()
