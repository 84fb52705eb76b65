// Transposition of one 16 x 16 block of a packed panel (pack.h), the inner step of
// pack_transposed_block. A block is 512 contiguous bytes in both layouts:
//   src: offset(n, k) = (k / 2) * 32 + n * 2 + k % 2     (BF16 pairs along k, 16 n per 64-byte row)
//   dst: offset(n, k) = (n / 2) * 32 + k * 2 + n % 2     (BF16 pairs along n, 16 k per 64-byte row)
#pragma once

#include <cstdint>

namespace kt {

using TransposeBlockFn = void (*)(uint16_t *__restrict__ dst, const uint16_t *__restrict__ src);

void transpose_block_scalar(uint16_t *dst, const uint16_t *src);
void transpose_block_avx2(uint16_t *dst, const uint16_t *src);
void transpose_block_avx512(uint16_t *dst, const uint16_t *src);

}  // namespace kt
