#include "pack.h"

#include <cstring>

namespace kt {

template <typename T>
void pack_weight(T *dst, const T *W, int64_t ld, int64_t N, int64_t K) {
    const int64_t Np = round_up(N, kPanelCols), Kp = round_up(K, kKAlign);
    std::memset(dst, 0, sizeof(T) * Np * Kp);
    for (int64_t n = 0; n < N; ++n) {
        T *panel = dst + (n / 16) * Kp * 16 + (n % 16) * 2;
        const T *row = W + n * ld;
        for (int64_t k = 0; k < K; ++k) panel[(k / 2) * 32 + (k % 2)] = row[k];
    }
}

template void pack_weight<uint16_t>(uint16_t *, const uint16_t *, int64_t, int64_t, int64_t);
template void pack_weight<uint8_t>(uint8_t *, const uint8_t *, int64_t, int64_t, int64_t);

void unpack_weight(uint16_t *W, int64_t ld, const uint16_t *src, int64_t N, int64_t K) {
    const int64_t Kp = round_up(K, kKAlign);
    for (int64_t n = 0; n < N; ++n) {
        const uint16_t *panel = src + (n / 16) * Kp * 16 + (n % 16) * 2;
        uint16_t *row = W + n * ld;
        for (int64_t k = 0; k < K; ++k) row[k] = panel[(k / 2) * 32 + (k % 2)];
    }
}

}  // namespace kt
