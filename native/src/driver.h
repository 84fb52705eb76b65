// Shared pieces of the forward and backward drivers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dispatch.h"
#include "experts.h"
#include "kt_trl.h"
#include "routing.h"
#include "thread_pool.h"
#include "workspace.h"

namespace kt {

// Blocking of the expert GEMMs. A work item is (expert, column block); inside it the expert's rows
// go in chunks of kRowBlock and K in slices of kKSlice, so that the A slice of a 32-row band
// (32 x 512 BF16 = 32 KiB) stays in L1 while it meets every panel of the block, and the block's
// weight slice (<= 256 columns x 512 = 256 KiB) stays in L2 while every band passes over it.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kKSlice = 512;
constexpr int64_t kMaxColBlock = 256;
// Rows per chunk of the row-wise stages: their FP32 row buffers (rows x H) stay in L2.
constexpr int64_t kChunkRows = 32;

// Columns per work item: the item's whole weight block (cols x Kp BF16) should fit in ~1 MiB of
// L2, since it is read from DRAM once and reused by every row chunk of the expert.
inline int64_t col_block(int64_t Kp) {
    const int64_t fit = (int64_t(1) << 20) / (Kp * 2) / 32 * 32;
    return std::max<int64_t>(64, std::min(kMaxColBlock, fit));
}

// C [rows, cols] (ldc) = A [rows, Kp] (lda) . W^T, W = `cols / 16` packed panels of stride ldw, K-sliced.
inline void gemm_rows(const Kernels &K, float *C, int64_t ldc, const uint16_t *A, int64_t lda, const uint16_t *W,
                      int64_t ldw, int64_t rows, int64_t cols, int64_t Kp) {
    for (int64_t k0 = 0; k0 < Kp; k0 += kKSlice)
        K.gemm_bf16(C, ldc, A + k0, lda, W + k0 * 16, ldw, rows, cols, std::min(kKSlice, Kp - k0), k0 > 0);
}

// A run of sorted rows of one expert: the unit of the row-wise stages.
struct RowChunk {
    int64_t expert, row0, rows;
};

inline std::vector<RowChunk> row_chunks(const RoutePlan &plan, int64_t chunk = kChunkRows) {
    std::vector<RowChunk> out;
    for (int64_t e : plan.order) {
        const int64_t n = plan.count(e);
        if (n == 0) break;
        for (int64_t r = 0; r < n; r += chunk) out.push_back({e, plan.offsets[e] + r, std::min(chunk, n - r)});
    }
    return out;
}

// Adds the wall time of a scope to one KT_STAGE_* counter (read by kt_profile_read).
class StageTimer {
public:
    explicit StageTimer(int stage);
    ~StageTimer();
    StageTimer(const StageTimer &) = delete;
    StageTimer &operator=(const StageTimer &) = delete;

private:
    int stage_;
    double start_;
};
void profile_read(double *ms, bool reset);

// One projection's LoRA as the drivers see it (rank 0 = none).
struct LoraView {
    const float *A = nullptr;   // [E, r, in]
    const float *B = nullptr;   // strided, see kt_lora
    int64_t r = 0, se = 0, so = 0, sq = 0;
    float scale = 0.0f;
};

// Checks one kt_lora against the projection [out, in] of E experts and returns its view.
LoraView lora_view(const kt_lora *lora, int64_t E, int64_t out, int64_t in, const char *name);

// out[t] = bf16(sum_j c_j rows[t * k + j]) over the token's routes that are not the sentinel,
// j increasing, c_j = w[t, j] when weighted and 1 otherwise: the one rounding of y and dx.
void sum_routes(uint16_t *out, const float *rows, const RoutePlan &plan, int64_t H, bool weighted);

// Forward of one layer (kt_experts_forward, its arguments checked); saved's pointers may be NULL.
void forward_layer(const kt_experts &ex, uint16_t *y, const kt_saved_activations &saved, const uint16_t *x,
                   const RoutePlan &plan, const LoraView &lora_gu, const LoraView &lora_dn);

// Backward of one layer (kt_experts_backward, its arguments checked); grads' pointers may be NULL.
void backward_layer(const kt_experts &ex, const kt_gradients &grads, const uint16_t *dy, const uint16_t *x,
                    const RoutePlan &plan, const kt_saved_activations &saved, const LoraView &lora_gu,
                    const LoraView &lora_dn);

}  // namespace kt
