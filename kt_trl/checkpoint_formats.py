"""The engine format a streamed checkpoint's experts take (`KTConfig.expert_format`), and reading an
FP8 checkpoint's expert codes and block scales as they are stored, without dequantizing them."""

from __future__ import annotations

import logging

import torch

from .checkpoint_keys import Shards
from .formats import QuantizedWeight, rows_of_block_scales, scale_blocks

logger = logging.getLogger(__name__)


def streamed_format(requested: str, shards: Shards, layout, keys) -> tuple[str, int | None]:
    """`(format, block_k)` of the engines `load_model` fills: `"auto"` keeps FP8 experts in FP8 where
    their codes can go to the engine as stored; `block_k` is None for the format's default."""
    readable = shards.fp8 and fp8_codes_fit(shards.fp8_block, layout) and all(shards.quantized(k) for k in keys)
    if requested == "auto":
        requested = "fp8" if readable else "bf16"
        if shards.fp8 and not readable:
            logger.warning("kt_trl: this FP8 checkpoint's experts cannot go to the engine as stored (%s); they are "
                           "dequantized to BF16 as read (2 bytes per weight).", _why_not(shards, layout))
    if requested == "fp8" and readable:
        return "fp8", fp8_block_k(shards.fp8_block)
    if shards.fp8:
        logger.info("kt_trl: dequantizing this FP8 checkpoint's experts as read, stored as %s.", requested.upper())
    return requested, None


def fp8_block_k(block: tuple[int, int] | None) -> int:
    """The engine's block_k for an FP8 checkpoint's `weight_block_size` (None: one scale per tensor)."""
    return 0 if block is None else block[1]


def fp8_codes_fit(block: tuple[int, int] | None, layout) -> bool:
    """Whether an FP8 checkpoint's codes and scales (blocks of `block`) can go to the engine as stored for
    `layout`: its expert matrices in the engine's orientation, scale blocks a multiple of 16 wide."""
    return not layout.transposed and not layout.interleaved and fp8_block_k(block) % 16 == 0


def _why_not(shards: Shards, layout) -> str:
    if layout.transposed or layout.interleaved:
        return f"the {layout.family} expert layout is transposed or interleaved"
    if fp8_block_k(shards.fp8_block) % 16:
        return f"scale blocks of {fp8_block_k(shards.fp8_block)} columns; the engine needs a multiple of 16"
    return "some expert weights are not FP8"


def fp8_buffers(shape: tuple[int, int], block_k: int) -> QuantizedWeight:
    """Reusable codes and scales of one expert's `[N, K]` weight."""
    N, K = shape
    return QuantizedWeight(torch.empty(N, K, dtype=torch.float8_e4m3fn), torch.empty(N, scale_blocks(K, block_k)),
                           block_k)


def read_fp8_codes(shards: Shards, sources, out: QuantizedWeight) -> None:
    """One expert's `[N, K]` slice of a fused parameter: the codes of its checkpoint tensors straight
    into `out.codes`, their block scales as rows of scales into `out.scales`."""
    block_rows = None if shards.fp8_block is None else shards.fp8_block[0]
    for source in sources:
        rows = source.rows
        first, count = int(rows[0]), rows.numel()
        scale_inv = shards.read(f"{source.key}_scale_inv", source.index)
        if scale_inv.numel() == 1:   # one scale for the tensor
            scales = scale_inv.float().reshape(1, 1).expand(count, out.scales.shape[1])
        else:
            scales = rows_of_block_scales(scale_inv, count, block_rows)
        if torch.equal(rows, torch.arange(first, first + count)):
            shards.read_into(source.key, out.codes[first:first + count], source.index)   # no copy
            out.scales[first:first + count] = scales
        else:
            codes = torch.empty(count, out.codes.shape[1], dtype=torch.float8_e4m3fn)
            shards.read_into(source.key, codes, source.index)
            out.codes.view(torch.uint8).index_copy_(0, rows, codes.view(torch.uint8))
            out.scales.index_copy_(0, rows, scales.contiguous())
