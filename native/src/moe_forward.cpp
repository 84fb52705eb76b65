// [NOTE] Forward of one MoE layer's routed experts.
//
//   y[t] = sum_j w[t,j] * down_e( silu(g) * u ),  [g | u] = x W_gu,e^T + s (x A^T) B^T,  e = id[t,j]
//
// Stages (each a parallel loop over work items; a barrier between stages):
//   1. gather   x rows into expert-sorted Xs [Nr, Hp] BF16; LoRA: LX = Xs A_gu^T      (row chunks)
//   2. gate_up  GU [Nr, 2I] = Xs W_gu^T (+ s LX Bt_gu), rounded to BF16             (expert x col block)
//   3. act      Hs [Nr, Ip] = silu(g) * u in BF16; LoRA: LH = Hs A_d^T; copies to the caller's
//               saved buffers in route order                                          (row chunks)
//   4. down     D [T*k, H] FP32 = Hs W_d^T (+ s LH Bt_d), one row per route          (expert x col block)
//   5. combine  y[t] = sum_j w[t,j] D[t*k+j], rounded once to BF16                    (token chunks)
// Differences from the obvious version: work items are (expert, column block), largest experts
// first, so a column block of an expert's weights is read once from DRAM (and for 8-bit weights
// decoded once to BF16) and reused from L2 by all its tokens (K-sliced, driver.h); expert outputs go to per-route rows and are summed over j in a fixed order, so
// results do not depend on the thread count; what backward needs (GU, LX, LH) is written to
// caller-owned buffers instead of a hidden cache.
#include <cstring>

#include "driver.h"
#include "error.h"
#include "kernels/bf16.h"
#include "lora_b.h"

namespace kt {

namespace {

struct ForwardScratch {
    uint16_t *xs;   // [Nr, Hp]  BF16 gathered tokens, expert-sorted (row stride ldx)
    uint16_t *gu;   // [Nr, GUp] BF16 gate | up pre-activations, when the caller saves none
    uint16_t *saved_gu;   // [T*k, 2I] the caller's buffer (route order), or NULL

    // Where the gate | up row of sorted row `row` lives: written once, straight to the caller's
    // saved buffer when there is one.
    uint16_t *gu_row(const RoutePlan &plan, int64_t row, int64_t I, int64_t GUp) const {
        return saved_gu ? saved_gu + plan.route[row] * 2 * I : gu + row * GUp;
    }
    uint16_t *hs;   // [Nr, Ip]  BF16 silu(g) * u (row stride ldh)
    float *lx;      // [Nr, r_gu] x A_gu^T
    float *lh;      // [Nr, r_d]  h A_d^T
    float *d;       // [T*k, H]  FP32 expert outputs per route
    EngineLoraB bt; // B_gu and B_d in the engine's layout (lora_b.h)
};

void gather_stage(const kt_experts &ex, const ForwardScratch &s, const uint16_t *x, const RoutePlan &plan,
                  const std::vector<RowChunk> &chunks, const LoraView &lora_gu) {
    const Kernels &K = *runtime().kernels;
    ThreadPool::run(static_cast<int64_t>(chunks.size()), [&](int64_t i, int w) {
        const RowChunk c = chunks[i];
        for (int64_t r = c.row0; r < c.row0 + c.rows; ++r) {
            uint16_t *dst = s.xs + r * ex.ldx;
            std::memcpy(dst, x + (plan.route[r] / plan.k) * ex.H, sizeof(uint16_t) * ex.H);
            std::memset(dst + ex.H, 0, sizeof(uint16_t) * (ex.Hp - ex.H));
        }
        if (lora_gu.r == 0) return;
        float *xf = workspace().threads[w].rows_a.get<float>(c.rows * ex.H);   // [rows, H]
        for (int64_t r = 0; r < c.rows; ++r) K.bf16_to_f32(xf + r * ex.H, s.xs + (c.row0 + r) * ex.ldx, ex.H);
        K.sgemm_nt(s.lx + c.row0 * lora_gu.r, lora_gu.r, xf, ex.H, lora_gu.A + c.expert * lora_gu.r * ex.H, ex.H,
                   c.rows, lora_gu.r, ex.H, 1.0f, false);
    });
}

// t[row, c] += bias[c] for the valid columns of a GEMM output block.
void add_bias(float *t, int64_t ldt, int64_t rows, int64_t cols, const float *bias) {
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) t[r * ldt + c] += bias[c];
}

// out rows = A rows . W^T (+ s * L . Bt) for one (expert, column block) item of weight w, columns
// [c0, c0 + cols), in row blocks. An 8-bit weight is decoded once per item: step by step inside
// the product where one row block holds all rows (gemm_q8), else as a whole block first.
template <typename Store>
void gemm_item(const Kernels &K, ThreadScratch &ts, const uint16_t *A, int64_t lda, const PackedWeight &w, int64_t c0,
               int64_t rows, int64_t cols, const float *L, int64_t r, const float *Bt, int64_t ldbt, float scale,
               const Store &store) {
    const int64_t Kp = w.layout->Kp;
    float *tile = ts.tile.get<float>(kRowBlock * kMaxColBlock);
    if (!w.layout->bf16() && K.gemm_q8 && rows <= kRowBlock) {
        K.gemm_q8(tile, cols, A, lda, q8_panels(w, c0), rows, cols, ts.decoded.get<uint16_t>(2 * Kp * 16));
        if (r > 0) K.sgemm_nn(tile, cols, L, r, Bt, ldbt, rows, cols, r, scale, true);
        store(0, rows, tile);
        return;
    }
    const uint16_t *panels = bf16_panels(w, c0, cols, ts.decoded, K);
    for (int64_t m = 0; m < rows; m += kRowBlock) {
        const int64_t mr = std::min(kRowBlock, rows - m);
        gemm_rows(K, tile, cols, A + m * lda, lda, panels, Kp * 16, mr, cols, Kp);
        if (r > 0) K.sgemm_nn(tile, cols, L + m * r, r, Bt, ldbt, mr, cols, r, scale, true);
        store(m, mr, tile);
    }
}

void gate_up_stage(const kt_experts &ex, const ForwardScratch &s, const RoutePlan &plan, const LoraView &lora_gu) {
    const Kernels &K = *runtime().kernels;
    const int64_t N = round_up(2 * ex.I, 16);
    const BlockItems items = block_items(plan, N, col_block(ex.Hp));
    ThreadPool::run(items.size(), [&](int64_t i, int w) {
        const int64_t e = items.expert[i], c0 = items.col0[i], cn = items.cols[i];
        const int64_t r0 = plan.offsets[e];
        gemm_item(K, workspace().threads[w], s.xs + r0 * ex.ldx, ex.ldx, ex.gate_up(e), c0, plan.count(e), cn,
                  s.lx + r0 * lora_gu.r, lora_gu.r, s.bt.gu + e * lora_gu.r * N + c0, N, lora_gu.scale,
                  [&](int64_t m, int64_t mr, float *t) {
                      const int64_t valid = std::min(cn, 2 * ex.I - c0);
                      if (ex.has_bias) add_bias(t, cn, mr, valid, ex.bias_gate_up(e) + c0);
                      for (int64_t row = 0; row < mr; ++row)
                          K.f32_to_bf16(s.gu_row(plan, r0 + m + row, ex.I, ex.GUp) + c0, t + row * cn, valid);
                  });
    });
}

void act_stage(const kt_experts &ex, const ForwardScratch &s, const RoutePlan &plan,
               const std::vector<RowChunk> &chunks, const LoraView &lora_dn, float *saved_lora_gu,
               float *saved_lora_dn, int64_t r_gu) {
    const Kernels &K = *runtime().kernels;
    ThreadPool::run(static_cast<int64_t>(chunks.size()), [&](int64_t i, int w) {
        const RowChunk c = chunks[i];
        float *hf = workspace().threads[w].rows_a.get<float>(c.rows * ex.Ip);   // [rows, Ip]
        for (int64_t r = 0; r < c.rows; ++r) {
            const int64_t row = c.row0 + r, route = plan.route[row];
            const uint16_t *gu = s.gu_row(plan, row, ex.I, ex.GUp);
            float *h = hf + r * ex.Ip;
            uint16_t *hb = s.hs + row * ex.ldh;
            K.glu(hb, h, gu, gu + ex.I, ex.I, ex.act);   // h = the rounded values the down GEMM sees
            std::memset(hb + ex.I, 0, sizeof(uint16_t) * (ex.Ip - ex.I));
            if (saved_lora_gu) std::memcpy(saved_lora_gu + route * r_gu, s.lx + row * r_gu, sizeof(float) * r_gu);
        }
        if (lora_dn.r == 0) return;
        float *lh = s.lh + c.row0 * lora_dn.r;
        K.sgemm_nt(lh, lora_dn.r, hf, ex.Ip, lora_dn.A + c.expert * lora_dn.r * ex.I, ex.I, c.rows, lora_dn.r, ex.I,
                   1.0f, false);
        if (saved_lora_dn)
            for (int64_t r = 0; r < c.rows; ++r)
                std::memcpy(saved_lora_dn + plan.route[c.row0 + r] * lora_dn.r, lh + r * lora_dn.r,
                            sizeof(float) * lora_dn.r);
    });
}

void down_stage(const kt_experts &ex, const ForwardScratch &s, const RoutePlan &plan, const LoraView &lora_dn) {
    const Kernels &K = *runtime().kernels;
    const int64_t N = round_up(ex.H, 16);
    const BlockItems items = block_items(plan, N, col_block(ex.Ip));
    ThreadPool::run(items.size(), [&](int64_t i, int w) {
        const int64_t e = items.expert[i], c0 = items.col0[i], cn = items.cols[i];
        const int64_t r0 = plan.offsets[e], valid = std::min(cn, ex.H - c0);
        gemm_item(K, workspace().threads[w], s.hs + r0 * ex.ldh, ex.ldh, ex.down(e), c0, plan.count(e), cn,
                  s.lh + r0 * lora_dn.r, lora_dn.r, s.bt.d + e * lora_dn.r * N + c0, N, lora_dn.scale,
                  [&](int64_t m, int64_t mr, float *t) {
                      if (ex.has_bias) add_bias(t, cn, mr, valid, ex.bias_down(e) + c0);
                      for (int64_t row = 0; row < mr; ++row)
                          std::memcpy(s.d + plan.route[r0 + m + row] * ex.H + c0, t + row * cn, sizeof(float) * valid);
                  });
    });
}

}  // namespace

void sum_routes(uint16_t *out, const float *rows, const RoutePlan &plan, int64_t H, bool weighted) {
    const Kernels &K = *runtime().kernels;
    const int64_t chunk = 16;
    ThreadPool::run((plan.T + chunk - 1) / chunk, [&](int64_t i, int w) {
        float *acc = workspace().threads[w].rows_b.get<float>(H);
        for (int64_t t = i * chunk; t < std::min(plan.T, (i + 1) * chunk); ++t) {
            std::fill(acc, acc + H, 0.0f);
            for (int64_t j = 0; j < plan.k; ++j) {
                const int64_t route = t * plan.k + j;
                if (plan.row_of[route] < 0) continue;
                const float c = weighted ? plan.weight[route] : 1.0f;
                const float *d = rows + route * H;
                for (int64_t h = 0; h < H; ++h) acc[h] += c * d[h];
            }
            K.f32_to_bf16(out + t * H, acc, H);
        }
    });
}

void forward_layer(const kt_experts &ex, uint16_t *y, const kt_saved_activations &saved, const uint16_t *x,
                   const RoutePlan &plan, const LoraView &lora_gu, const LoraView &lora_dn) {
    Workspace &ws = workspace();
    ws.ensure_threads(ThreadPool::size());
    const int64_t Nr = plan.rows();
    ForwardScratch s{};
    s.xs = ws.gathered.get<uint16_t>(Nr * ex.ldx);
    s.saved_gu = saved.gate_up;
    s.gu = saved.gate_up ? nullptr : ws.gate_up.get<uint16_t>(Nr * ex.GUp);
    s.hs = ws.inter.get<uint16_t>(Nr * ex.ldh);
    s.lx = ws.lora_gate_up.get<float>(Nr * lora_gu.r + 1);
    s.lh = ws.lora_down.get<float>(Nr * lora_dn.r + 1);
    s.d = ws.routes.get<float>(plan.T * plan.k * ex.H + 1);
    s.bt = lora_b_to_engine(ex, lora_gu, lora_dn);
    const std::vector<RowChunk> chunks = row_chunks(plan);
    { StageTimer timer(KT_STAGE_FWD_GATHER); gather_stage(ex, s, x, plan, chunks, lora_gu); }
    { StageTimer timer(KT_STAGE_FWD_GATE_UP); gate_up_stage(ex, s, plan, lora_gu); }
    {
        StageTimer timer(KT_STAGE_FWD_ACT);
        act_stage(ex, s, plan, chunks, lora_dn, saved.lora_gate_up, saved.lora_down, lora_gu.r);
    }
    { StageTimer timer(KT_STAGE_FWD_DOWN); down_stage(ex, s, plan, lora_dn); }
    { StageTimer timer(KT_STAGE_FWD_COMBINE); sum_routes(y, s.d, plan, ex.H, true); }

    // Sentinel routes have no saved rows from the stages above: give them zeros, not garbage.
    for (int64_t route = 0; route < plan.T * plan.k; ++route) {
        if (plan.row_of[route] >= 0) continue;
        if (saved.gate_up) std::memset(saved.gate_up + route * 2 * ex.I, 0, sizeof(uint16_t) * 2 * ex.I);
        if (saved.lora_gate_up) std::memset(saved.lora_gate_up + route * lora_gu.r, 0, sizeof(float) * lora_gu.r);
        if (saved.lora_down) std::memset(saved.lora_down + route * lora_dn.r, 0, sizeof(float) * lora_dn.r);
    }
}

}  // namespace kt
