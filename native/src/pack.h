// The one packed weight layout, shared by every ISA path ("VNNI-2", the AMX B-tile format).
//
// A frozen weight W [N, K] (N output columns of y = x W^T, K contiguous) is stored as
// Np / 16 panels of 16 output columns; inside a panel, BF16 pairs run along K:
//
//   panel p (columns 16p .. 16p+15), Kp / 2 rows of 64 bytes:
//
//          lane:   0        1        2              15
//   row q:     [w0,2q w0,2q+1 | w1,2q w1,2q+1 | ... | w15,2q w15,2q+1]     (w_c,k = W[16p + c, k])
//   row q+1:   [w0,2q+2 ...                                          ]
//
//   offset of W[16p + c, 2q + b] = p * Kp * 16 + q * 32 + c * 2 + b
//
// Np = round_up(N, 16) and Kp = round_up(K, 32) so that one AMX tile (16 rows x 64 bytes) covers
// 32 K values of a panel; padding is zero. For the model shapes we target (N, K multiples of 32)
// the packed copy is exactly the BF16 bytes of the weights.
#pragma once

#include <cstddef>
#include <cstdint>

namespace kt {

constexpr int64_t kPanelCols = 16;   // output columns per panel
constexpr int64_t kKAlign = 32;      // K padding: one AMX tile of BF16 pairs
constexpr int64_t kPanelRowBytes = kPanelCols * 2 * sizeof(uint16_t);
static_assert(kPanelRowBytes == 64, "a panel row is one 64-byte AMX tile row / cache line");
static_assert(kKAlign % 2 == 0, "K is stored in BF16 pairs");

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Element count of a packed [N, K] weight.
inline int64_t packed_elems(int64_t N, int64_t K) { return round_up(N, kPanelCols) * round_up(K, kKAlign); }

// Packs W [N, K] (row stride ld) into dst (packed_elems(N, K) values): BF16 values, or the
// one-byte codes of an 8-bit format (packed_weight.h) in the same positions.
template <typename T>
void pack_weight(T *dst, const T *W, int64_t ld, int64_t N, int64_t K);

// Inverse of pack_weight: writes W [N, K] with row stride ld.
void unpack_weight(uint16_t *W, int64_t ld, const uint16_t *src, int64_t N, int64_t K);

}  // namespace kt
