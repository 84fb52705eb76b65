#include "packed_weight.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "error.h"

namespace kt {

WeightLayout::WeightLayout(int32_t format_, int64_t N_, int64_t K_, int64_t block_k)
    : format(format_), N(N_), K(K_), Np(round_up(N_, kPanelCols)), Kp(round_up(K_, kKAlign)) {
    if (bf16()) return;
    bk = block_k <= 0 || block_k >= K ? Kp : block_k;   // one block per row: padding included
    nkb = (K + bk - 1) / bk;
}

PackedWeight WeightLayout::at(uint8_t *base) const {
    return PackedWeight{this, base, bf16() ? nullptr : reinterpret_cast<float *>(base + code_bytes())};
}

Q8Panels q8_panels(const PackedWeight &w, int64_t c0) {
    const WeightLayout &l = *w.layout;
    return {w.data + (c0 / 16) * l.Kp * 16, w.scales + (c0 / 16) * l.nkb * 16, l.Kp, l.nkb, l.bk / 2, l.format};
}

namespace {

// nq rows of panel p from row q0 as BF16 (32 values per row) into dst.
void decode_rows(uint16_t *dst, const PackedWeight &w, int64_t p, int64_t q0, int64_t nq, const Kernels &K) {
    decode_panel_rows(dst, q8_panels(w, 0), p, q0, nq, K.decode_rows);
}

// The lines of [p, p + bytes) toward L2: the start of the next panel's stream, read while the
// current panel is worked on.
void prefetch_l2(const void *p, int64_t bytes) {
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const uint8_t *>(p) + b, 0, 2);
}

bool usable_scale(float s) {
    const float a = std::fabs(s);
    return s == 0.0f || (a >= 0x1p-100f && a <= 0x1p100f);   // also false for NaN and infinities
}

}  // namespace

void pack_bf16(const PackedWeight &w, const uint16_t *W, int64_t ld) {
    pack_weight(reinterpret_cast<uint16_t *>(w.data), W, ld, w.layout->N, w.layout->K);
}

void pack_8bit(const PackedWeight &w, const uint8_t *codes, int64_t ld, const float *scales, const char *what) {
    const WeightLayout &l = *w.layout;
    if (l.format == KT_FORMAT_FP8_E4M3)
        for (int64_t n = 0; n < l.N; ++n)
            for (int64_t k = 0; k < l.K; ++k)
                KT_CHECK((codes[n * ld + k] & 0x7F) != 0x7F,
                         "%s: FP8 code 0x%02X at [%lld, %lld] is NaN; the checkpoint's weights must be finite", what,
                         codes[n * ld + k], (long long)n, (long long)k);
    for (int64_t i = 0; i < l.N * l.nkb; ++i)
        KT_CHECK(usable_scale(scales[i]),
                 "%s: scale %g at [%lld, %lld] is not 0 or in [2^-100, 2^100] in magnitude", what, scales[i],
                 (long long)(i / l.nkb), (long long)(i % l.nkb));
    pack_weight(w.data, codes, ld, l.N, l.K);
    std::fill_n(w.scales, l.scale_count(), 0.0f);
    for (int64_t n = 0; n < l.N; ++n)
        for (int64_t kb = 0; kb < l.nkb; ++kb)
            w.scales[((n / 16) * l.nkb + kb) * 16 + n % 16] = scales[n * l.nkb + kb];
}

void unpack(uint16_t *W, int64_t ld, const PackedWeight &w) {
    const WeightLayout &l = *w.layout;
    if (l.bf16()) {
        unpack_weight(W, ld, w.panels(), l.N, l.K);
        return;
    }
    std::vector<uint16_t> panel(l.Kp * 16);   // one decoded panel
    for (int64_t p = 0; p < l.Np / 16; ++p) {
        decode_rows(panel.data(), w, p, 0, l.Kp / 2, kernels_scalar);
        for (int64_t n = p * 16; n < std::min(l.N, p * 16 + 16); ++n)
            for (int64_t k = 0; k < l.K; ++k) W[n * ld + k] = panel[(k / 2) * 32 + (n % 16) * 2 + k % 2];
    }
}

const uint16_t *bf16_panels(const PackedWeight &w, int64_t c0, int64_t cn, Buffer &buf, const Kernels &K) {
    const WeightLayout &l = *w.layout;
    if (l.bf16()) return w.panels() + (c0 / 16) * l.Kp * 16;
    uint16_t *dst = buf.get<uint16_t>(cn * l.Kp);
    // Panel by panel, 64 packed rows (2 KiB of codes) at a time, the next panel's same rows
    // prefetched meanwhile: each panel's codes are a new stream from DRAM.
    constexpr int64_t kRows = 64;
    const int64_t panels = cn / 16;
    for (int64_t i = 0; i < panels; ++i)
        for (int64_t q = 0; q < l.Kp / 2; q += kRows) {   // codes: one byte a value
            const int64_t nq = std::min(kRows, l.Kp / 2 - q);
            if (i + 1 < panels) prefetch_l2(w.data + ((c0 / 16 + i + 1) * l.Kp + q * 2) * 16, nq * 32);
            decode_rows(dst + i * l.Kp * 16 + q * 32, w, c0 / 16 + i, q, nq, K);
        }
    return dst;
}

namespace {

const uint16_t *wt_rows(const void *ctx, int64_t p0, int64_t p1, int64_t *ldw) {
    const WtSource &s = *static_cast<const WtSource *>(ctx);
    const WeightLayout &l = *s.w.layout;
    if (l.bf16()) {
        *ldw = l.Kp * 16;
        return s.w.panels() + p0 * l.Kp * 16 + (s.k0 / 2) * 32;
    }
    *ldw = s.kn * 16;
    uint16_t *dst = s.buf.get<uint16_t>(WtSource::run_elems(l, s.kn));
    for (int64_t p = p0; p < p1; ++p) decode_rows(dst + (p - p0) * s.kn * 16, s.w, p, s.k0 / 2, s.kn / 2, s.K);
    return dst;
}

}  // namespace

WtPanels WtSource::panels() const { return {wt_rows, this}; }

void pack_transposed_block(uint16_t *dst, const PackedWeight &w, int64_t k0, int64_t kn, const Kernels &K) {
    const WeightLayout &l = *w.layout;
    const int64_t Rp = round_up(l.N, kKAlign);   // reduction length of the transposed view
    const int64_t n_panels = l.Np / 16;
    // Source blocks past K (k0 + kn may exceed K up to the next multiple of 16) and reduction rows
    // past the last source panel are zero.
    const int64_t stored = std::clamp<int64_t>(l.Kp - k0, 0, kn);   // K values of the range inside the panels
    for (int64_t kb = stored; kb < kn; kb += 16) std::memset(dst + (kb / 16) * Rp * 16, 0, sizeof(uint16_t) * n_panels * 256);
    if (l.bf16()) {   // blocks straight from the panels, source panel by source panel (each a new stream
                      // from DRAM: the next one's same rows are prefetched meanwhile)
        for (int64_t np = 0; np < n_panels; ++np) {
            const uint16_t *src = w.panels() + np * l.Kp * 16 + (k0 / 2) * 32;
            for (int64_t kb = 0; kb < stored; kb += 16) {
                if (np + 1 < n_panels) prefetch_l2(src + l.Kp * 16 + kb * 16, 512);   // one 16 x 16 block
                K.transpose_block(dst + (kb / 16) * Rp * 16 + np * 256, src + kb * 16);
            }
        }
    } else {   // one decode per source panel and run of up to kDecodeRun K values, into a buffer in L1
        constexpr int64_t kDecodeRun = 256;
        alignas(64) uint16_t decoded[kDecodeRun * 16];
        for (int64_t np = 0; np < n_panels; ++np)
            for (int64_t kb = 0; kb < stored; kb += kDecodeRun) {
                const int64_t run = std::min(kDecodeRun, stored - kb);
                decode_rows(decoded, w, np, (k0 + kb) / 2, run / 2, K);
                for (int64_t b = 0; b < run / 16; ++b)   // its 16 x 16 blocks (512 bytes each)
                    K.transpose_block(dst + (kb / 16 + b) * Rp * 16 + np * 256, decoded + b * 256);
            }
    }
    if (Rp > n_panels * 16)
        for (int64_t kb = 0; kb < kn; kb += 16)
            std::memset(dst + (kb / 16) * Rp * 16 + n_panels * 256, 0, sizeof(uint16_t) * (Rp - n_panels * 16) * 16);
}

}  // namespace kt
