// One packed projection of one expert in any storage format, and the BF16 panels the GEMM
// kernels read from it.
//
// BF16: the panels of pack.h. 8-bit (W8A16: the kernels always multiply BF16; 8-bit weights are
// decoded to BF16 panels per work item, in L2): codes q [N, K] in the same panel positions, one
// byte per value, and FP32 scales s [N, nkb], one per row and block of bk K values:
//
//   W[n, k] = bf16(value(q[n, k]) * s[n, k / bk])        (FP32 product, rounded once, to nearest even)
//
// value() is an FP8 E4M3 number (the "fn" variant of torch.float8_e4m3fn: no infinities; the NaN
// codes 0x7F / 0xFF are refused at load) or an INT8 integer. DeepSeek-V3's 128 x 128 block scales
// are rows of s repeated over each block's 128 rows; INT8 per output row is bk = K. This is exactly
// torch's `(q.float() * s).bfloat16()`, so an 8-bit engine computes what a BF16 engine does on
// those dequantized weights, bit for bit. Scales are stored per panel,
//
//   scales[(p * nkb + kb) * 16 + c] = s[16p + c, kb]      (padded columns: 0)
//
// so decoding a panel row reads one 64-byte line of them.
#pragma once

#include <cstdint>

#include "kernels.h"
#include "kt_trl.h"
#include "pack.h"
#include "workspace.h"

namespace kt {

struct PackedWeight;

// Sizes of one packed projection W [N, K] in a format.
struct WeightLayout {
    int32_t format = KT_FORMAT_BF16;
    int64_t N = 0, K = 0, Np = 0, Kp = 0;
    int64_t bk = 0, nkb = 0;   // 8-bit: K values per scale (even, a multiple of 16 or >= K) and blocks per row

    WeightLayout() = default;
    // block_k: K values per scale for the 8-bit formats (0 = one scale per row); ignored for BF16.
    WeightLayout(int32_t format, int64_t N, int64_t K, int64_t block_k);
    bool bf16() const { return format == KT_FORMAT_BF16; }
    int64_t value_bytes() const { return bf16() ? 2 : 1; }
    int64_t code_bytes() const { return round_up(Np * Kp * value_bytes(), 64); }
    int64_t scale_count() const { return bf16() ? 0 : Np / 16 * nkb * 16; }
    int64_t bytes() const { return code_bytes() + round_up(scale_count() * 4, 64); }
    PackedWeight at(uint8_t *base) const;
};

struct PackedWeight {
    const WeightLayout *layout;
    uint8_t *data;    // BF16 panels or 8-bit codes
    float *scales;    // 8-bit only

    const uint16_t *panels() const { return reinterpret_cast<const uint16_t *>(data); }   // BF16 only
};

// Packs one projection: BF16 W [N, K] (row stride ld), or 8-bit codes [N, K] (row stride ld) with
// scales [N, nkb] contiguous. Codes and scales are checked (what) first: FP8 NaN codes and scales
// outside {0} U [2^-100, 2^100] in magnitude are refused, so no product is NaN, infinite or denormal.
void pack_bf16(const PackedWeight &w, const uint16_t *W, int64_t ld);
void pack_8bit(const PackedWeight &w, const uint8_t *codes, int64_t ld, const float *scales, const char *what);

// W [N, K] (row stride ld) in BF16: the packed values, decoded for the 8-bit formats.
void unpack(uint16_t *W, int64_t ld, const PackedWeight &w);

// The 8-bit weight w's codes and scales from panel c0 / 16 on.
Q8Panels q8_panels(const PackedWeight &w, int64_t c0);

// BF16 panels [c0, c0 + cn) / 16 of w over all of K (panel stride Kp * 16): the packed ones, or
// for an 8-bit weight decoded into buf.
const uint16_t *bf16_panels(const PackedWeight &w, int64_t c0, int64_t cn, Buffer &buf, const Kernels &K);

// gemm_bf16_wt's panels (kernels.h): packed rows [k0 / 2, (k0 + kn) / 2) of w's panels in BF16
// (k0, kn multiples of 32), in place for BF16, for an 8-bit weight decoded run by run into buf.
struct WtSource {
    const PackedWeight &w;
    int64_t k0, kn;
    Buffer &buf;
    const Kernels &K;
    WtPanels panels() const;
    // BF16 elements of buf that a decoded run of panels takes (none for a BF16 weight).
    static int64_t run_elems(const WeightLayout &l, int64_t kn) { return l.bf16() ? 0 : kWtPanelRun * kn * 16; }
};

// The transposed view, for dX = dY W: packed panels of W^T restricted to the K-columns
// [k0, k0 + kn) of W (kn % 16 == 0), i.e. a packed [kn, Np] weight whose reduction dimension is
// W's N. dst holds (kn / 16) panels of round_up(Np, 32) * 16 values. Rows of W past N (padding up
// to the next multiple of 32) and columns past K are zero.
void pack_transposed_block(uint16_t *dst, const PackedWeight &w, int64_t k0, int64_t kn, const Kernels &K);

}  // namespace kt
