"""gpt-oss's MXFP4 expert weights on disk, dequantized as read.

[NOTE] The published gpt-oss checkpoints (`quantization_config={"quant_method": "mxfp4"}`) store each
layer's fused experts as `<name>_blocks [E, R, C / 32, 16]` uint8, two FP4 (E2M1) codes per byte,
low nibble first, and `<name>_scales [E, R, C / 32]` uint8, one power-of-two exponent (biased by 127)
per 32 codes; the model's parameter `<name>` is the `[E, C, R]` transpose of the dequantized
`[E, R, C]`. Every product code · 2^k is exact in FP32 and in BF16, so dequantizing here and then
rounding to the model's dtype gives what transformers' `Mxfp4Config(dequantize=True)` gives.
"""

from __future__ import annotations

import torch

BLOCKS, SCALES = "_blocks", "_scales"
# E2M1 values of the 16 codes.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(quantization) -> bool:
    """Whether a `quantization_config` (dict or object) is gpt-oss's MXFP4."""
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    return settings.get("quant_method") == "mxfp4"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """`blocks [..., R, G, 16]` uint8 and `scales [..., R, G]` uint8 -> the parameter's `[..., G * 32, R]`
    in FP32 (the transpose of the `[R, C]` they encode)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
                         "([..., R, G, 16] and [..., R, G]).")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()   # [..., R, G, 16, 2]: low nibble first
    values = table[codes].flatten(-3)                                    # [..., R, G * 32]
    exponents = scales.to(torch.int32) - 127
    values = torch.ldexp(values, exponents.repeat_interleave(32, dim=-1))
    return values.transpose(-1, -2).contiguous()
