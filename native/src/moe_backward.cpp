// [NOTE] Backward of one MoE layer's routed experts, given dY [T, H].
//
// For a route (t, j) to expert e with weight w, h = silu(g) * u and W_d,eff = W_d + s B_d A_d:
//   G    = dY_t W_d,eff                      (unweighted; [I])
//   dw   = <G, h>  = <dY_t, Expert_e(x_t)>   (no expert output is cached)
//   dh   = w G;  dg = dh * u * silu'(g);  du = dh * silu(g)
//   dX_t += [dg | du] W_gu,eff
//   LoRA: dB_d += s (w dY)^T (h A_d^T), dA_d += s (w dY B_d)^T h,
//         dB_gu += s dGU^T (x A_gu^T),  dA_gu += s (dGU B_gu)^T x
// Stages:
//   1. gather   dY rows into an expert-sorted BF16 buffer;
//               LoRA: TY = dY B_d                                                  (row chunks)
//   2. G        G [Nr, Ip] FP32 = dYs W_d (+ s TY A_d)                               (expert x col block)
//               W_d is packed for y = h W_d^T, so each item transposes its columns of W_d
//               into per-thread panels (pack_transposed_block, decoding 8-bit weights on the
//               way): no second weight copy is kept. Experts with few rows instead read the
//               panels as they are (gemm_bf16_wt on AMX, kernels.h), one item per expert.
//   3. act'     dw, dGU [Nr, GUp] BF16; TG = dGU B_gu; LoRA gradients of both
//               projections from the same rows                                       (per expert)
//   4. dX       DX [T*k, H] FP32 = dGU W_gu (+ s TG A_gu), transposed panels again   (expert x col block)
//   5. combine  dx[t] = sum_j DX[t*k+j], rounded once to BF16                        (token chunks)
// Every output element is written by one work item in a fixed order: the result does not depend
// on the number of threads. LoRA gradients are per expert, accumulated over row chunks in order.
#include <cstring>
#include <functional>

#include "driver.h"
#include "error.h"
#include "kernels/bf16.h"
#include "lora_b.h"

namespace kt {
namespace {

struct BackwardScratch {
    uint16_t *dys;   // [Nr, Hp]  BF16 gathered dY (unweighted; row stride ldx, like xs)
    float *g;        // [Nr, Ip]  FP32 dY W_d,eff
    uint16_t *dgu;   // [Nr, GUp] BF16 [dg | du] (row stride ldgu)
    float *ty;       // [Nr, r_d]  dY B_d
    float *tg;       // [Nr, r_gu] dGU B_gu
    float *dx;       // [T*k, H]  FP32 per-route input gradients
    EngineLoraB bt;  // B_gu and B_d in the engine's layout (lora_b.h)
    float *db_d;     // [E, r_d, H]   dB_d per expert, before lora_db_from_engine
    float *db_gu;    // [E, r_gu, 2I] dB_gu per expert
};

void gather_stage(const kt_experts &ex, const BackwardScratch &s, const uint16_t *dy, const RoutePlan &plan,
                  const std::vector<RowChunk> &chunks, const LoraView &lora_dn) {
    const Kernels &K = *runtime().kernels;
    ThreadPool::run(static_cast<int64_t>(chunks.size()), [&](int64_t i, int w) {
        const RowChunk c = chunks[i];
        for (int64_t r = c.row0; r < c.row0 + c.rows; ++r) {
            const int64_t t = plan.route[r] / plan.k;
            std::memcpy(s.dys + r * ex.ldx, dy + t * ex.H, sizeof(uint16_t) * ex.H);
            std::memset(s.dys + r * ex.ldx + ex.H, 0, sizeof(uint16_t) * (ex.Hp - ex.H));
        }
        if (lora_dn.r == 0) return;
        float *df = workspace().threads[w].rows_a.get<float>(c.rows * ex.H);
        for (int64_t r = 0; r < c.rows; ++r) K.bf16_to_f32(df + r * ex.H, s.dys + (c.row0 + r) * ex.ldx, ex.H);
        K.sgemm_nt(s.ty + c.row0 * lora_dn.r, lora_dn.r, df, ex.H, s.bt.d + c.expert * lora_dn.r * s.bt.n_d, s.bt.n_d,
                   c.rows, lora_dn.r, ex.H, 1.0f, false);
    });
}

// rows of C = A . W (W given packed for y = x W^T: transposed panels per item) (+ s L . A_lora).
void transposed_stage(const kt_experts &ex, const RoutePlan &plan, bool is_down, const uint16_t *A, int64_t lda,
                      const float *L, const LoraView &l, int64_t out_n,
                      const std::function<void(int64_t row, int64_t c0, int64_t valid, const float *t)> &store) {
    const Kernels &K = *runtime().kernels;
    const int64_t N = round_up(out_n, 16);
    const int64_t wN = is_down ? ex.H : 2 * ex.I;   // the packed weight is [wN, wK]
    const int64_t Rp = round_up(wN, kKAlign);
    const int64_t block = col_block(Rp);
    // Experts with few rows: the product read straight from the weight's panels (kernels.h; 8-bit
    // ones decoded a run of panels at a time), one item over all columns, so that each panel is
    // read front to back; the others: items of a column block, each with a transposed copy of its
    // columns that all its rows reuse.
    const int64_t decoded_run = WtSource::run_elems(is_down ? ex.d_layout : ex.gu_layout, round_up(N, 32)) * 2;
    const int64_t direct_rows = K.gemm_bf16_wt ? wt_max_rows(round_up(wN, 16), N, decoded_run) : 0;
    const BlockItems items = block_items(plan, N, block, direct_rows);
    ThreadPool::run(items.size(), [&](int64_t i, int w) {
        const int64_t e = items.expert[i], c0 = items.col0[i], cn = items.cols[i];
        const int64_t r0 = plan.offsets[e], rows = plan.count(e), valid = std::min(cn, out_n - c0);
        ThreadScratch &ts = workspace().threads[w];
        const PackedWeight weight = is_down ? ex.down(e) : ex.gate_up(e);
        // The LoRA term and the store of rows [m, m + mr) of the item's tile.
        const auto finish = [&](float *tile, int64_t m, int64_t mr) {
            if (l.r > 0)
                K.sgemm_nn(tile, cn, L + (r0 + m) * l.r, l.r, l.A + e * l.r * out_n + c0, out_n, mr, valid, l.r,
                           l.scale, true);
            for (int64_t row = 0; row < mr; ++row) store(r0 + m + row, c0, valid, tile + row * cn);
        };
        if (rows <= direct_rows) {
            const int64_t Rn = weight.layout->Np;
            const WtSource source{weight, c0, round_up(cn, 32), ts.decoded, K};
            float *tile = ts.tile.get<float>(rows * cn);
            K.gemm_bf16_wt(tile, cn, A + r0 * lda, lda, source.panels(), rows, Rn, cn,
                           ts.panels.get<uint16_t>(wt_scratch_elems(rows, Rn, cn)));
            finish(tile, 0, rows);
            return;
        }
        uint16_t *panels = ts.panels.get<uint16_t>(Rp * block);
        pack_transposed_block(panels, weight, c0, cn, K);
        float *tile = ts.tile.get<float>(kRowBlock * kMaxColBlock);
        for (int64_t m = 0; m < rows; m += kRowBlock) {
            const int64_t mr = std::min(kRowBlock, rows - m);
            gemm_rows(K, tile, cn, A + (r0 + m) * lda, lda, panels, Rp * 16, mr, cn, Rp);
            finish(tile, m, mr);
        }
    });
}

struct ActInputs {
    const uint16_t *x;                    // [T, H], read by route for the gate_up LoRA A gradient
    const kt_saved_activations *saved;    // the forward's, route order
    const kt_gradients *grads;            // where the outputs go
};

// One chunk of rows: dw and dGU (BF16) into the scratch.
void act_rows(const kt_experts &ex, const BackwardScratch &s, const RoutePlan &plan, const RowChunk &c,
              const ActInputs &in, float *hf) {
    const Kernels &K = *runtime().kernels;
    for (int64_t r = 0; r < c.rows; ++r) {
        const int64_t row = c.row0 + r, route = plan.route[row];
        const uint16_t *gu = in.saved->gate_up + route * 2 * ex.I;
        uint16_t *dgu = s.dgu + row * ex.ldgu;
        float dw = K.glu_backward(dgu, dgu + ex.I, hf + r * ex.I, s.g + row * ex.Ip, plan.weight[route], gu,
                                  gu + ex.I, ex.I, ex.act);
        if (ex.has_bias) {   // the expert output includes the down bias: dw += <dY_t, b_d>
            const uint16_t *dy = s.dys + row * ex.ldx;
            const float *b = ex.bias_down(c.expert);
            for (int64_t h = 0; h < ex.H; ++h) dw += bf16_to_float(dy[h]) * b[h];
        }
        if (in.grads->dw) in.grads->dw[route] = dw;
        std::memset(dgu + 2 * ex.I, 0, sizeof(uint16_t) * (ex.GUp - 2 * ex.I));
    }
}

// Rows of a route-ordered saved buffer [T*k, r] for one chunk, into dst [rows, r].
void gather_saved(float *dst, const float *saved, int64_t r, const RoutePlan &plan, const RowChunk &c) {
    for (int64_t i = 0; i < c.rows; ++i)
        std::memcpy(dst + i * r, saved + plan.route[c.row0 + i] * r, sizeof(float) * r);
}

// Down-projection LoRA gradients of one chunk: dB_d^T += s LH^T (w dY), dA_d += s (w TY)^T h.
void lora_down_grads(const kt_experts &ex, const BackwardScratch &s, const RoutePlan &plan, const RowChunk &c,
                     const ActInputs &in, const LoraView &lora_dn, const float *hf, ThreadScratch &ts, float *dBtmp) {
    const Kernels &K = *runtime().kernels;
    const kt_lora_grad &g = in.grads->lora_down;
    float *lr = ts.lora_rows.get<float>(c.rows * lora_dn.r * 2);   // [rows, r] LH, then [rows, r] w TY
    float *wty = lr + c.rows * lora_dn.r;
    for (int64_t i = 0; i < c.rows; ++i) {
        const float wt = plan.weight[plan.route[c.row0 + i]];
        for (int64_t q = 0; q < lora_dn.r; ++q) wty[i * lora_dn.r + q] = wt * s.ty[(c.row0 + i) * lora_dn.r + q];
    }
    if (g.dA)
        K.sgemm_tn(g.dA + c.expert * lora_dn.r * ex.I, ex.I, wty, lora_dn.r, hf, ex.I, lora_dn.r, ex.I, c.rows,
                   lora_dn.scale, true);
    if (!g.dB) return;
    gather_saved(lr, in.saved->lora_down, lora_dn.r, plan, c);
    float *wdy = ts.rows_b.get<float>(c.rows * ex.H);   // [rows, H] w dY
    for (int64_t i = 0; i < c.rows; ++i) {
        const float wt = plan.weight[plan.route[c.row0 + i]];
        K.bf16_to_f32(wdy + i * ex.H, s.dys + (c.row0 + i) * ex.ldx, ex.H);
        for (int64_t h = 0; h < ex.H; ++h) wdy[i * ex.H + h] *= wt;
    }
    K.sgemm_tn(dBtmp, ex.H, lr, lora_dn.r, wdy, ex.H, lora_dn.r, ex.H, c.rows, lora_dn.scale, true);
}

// dGU of one chunk as FP32 [rows, 2I].
float *dgu_rows(const kt_experts &ex, const BackwardScratch &s, const RowChunk &c, ThreadScratch &ts) {
    const Kernels &K = *runtime().kernels;
    const int64_t I2 = 2 * ex.I;
    float *dguf = ts.rows_b.get<float>(c.rows * I2);
    for (int64_t i = 0; i < c.rows; ++i) K.bf16_to_f32(dguf + i * I2, s.dgu + (c.row0 + i) * ex.ldgu, I2);
    return dguf;
}

// Gate_up LoRA gradients of one chunk: dB_gu^T += s LX^T dGU (dguf = dGU as FP32), dA_gu += s TG^T x.
void lora_gate_up_grads(const kt_experts &ex, const BackwardScratch &s, const RoutePlan &plan,
                        const RowChunk &c, const ActInputs &in, const LoraView &lora_gu, const float *dguf,
                        ThreadScratch &ts, float *dBtmp) {
    const Kernels &K = *runtime().kernels;
    const kt_lora_grad &g = in.grads->lora_gate_up;
    if (g.dB) {
        float *lx = ts.lora_rows.get<float>(c.rows * lora_gu.r);
        gather_saved(lx, in.saved->lora_gate_up, lora_gu.r, plan, c);
        K.sgemm_tn(dBtmp, 2 * ex.I, lx, lora_gu.r, dguf, 2 * ex.I, lora_gu.r, 2 * ex.I, c.rows, lora_gu.scale, true);
    }
    if (g.dA) {
        float *xf = ts.rows_c.get<float>(c.rows * ex.H);
        for (int64_t i = 0; i < c.rows; ++i)
            K.bf16_to_f32(xf + i * ex.H, in.x + (plan.route[c.row0 + i] / plan.k) * ex.H, ex.H);
        K.sgemm_tn(g.dA + c.expert * lora_gu.r * ex.H, ex.H, s.tg + c.row0 * lora_gu.r, lora_gu.r, xf, ex.H,
                   lora_gu.r, ex.H, c.rows, lora_gu.scale, true);
    }
}

// Which LoRA gradients a call asks for.
struct LoraGrads {
    bool down, gate_up;
    LoraGrads(const kt_gradients &g, const LoraView &lora_gu, const LoraView &lora_dn)
        : down(lora_dn.r > 0 && (g.lora_down.dA || g.lora_down.dB)),
          gate_up(lora_gu.r > 0 && (g.lora_gate_up.dA || g.lora_gate_up.dB)) {}
};

// Before an expert's first chunk: its dA and dB accumulators start at 0.
void begin_expert_grads(const kt_experts &ex, const BackwardScratch &s, const kt_gradients &g, const LoraGrads &want,
                        int64_t e, const LoraView &lora_gu, const LoraView &lora_dn) {
    if (want.down && g.lora_down.dB) std::fill_n(s.db_d + e * ex.H * lora_dn.r, ex.H * lora_dn.r, 0.0f);
    if (want.gate_up && g.lora_gate_up.dB)
        std::fill_n(s.db_gu + e * 2 * ex.I * lora_gu.r, 2 * ex.I * lora_gu.r, 0.0f);
    if (want.down && g.lora_down.dA) std::fill_n(g.lora_down.dA + e * lora_dn.r * ex.I, lora_dn.r * ex.I, 0.0f);
    if (want.gate_up && g.lora_gate_up.dA)
        std::fill_n(g.lora_gate_up.dA + e * lora_gu.r * ex.H, lora_gu.r * ex.H, 0.0f);
}

// One chunk's LoRA gradients, given its h (hf) and dGU (dguf) as FP32. Gate_up first: dguf lives
// in ts.rows_b, which the down gradients reuse.
void lora_grads_rows(const kt_experts &ex, const BackwardScratch &s, const RoutePlan &plan, const RowChunk &c,
                     const ActInputs &in, const LoraGrads &want, const LoraView &lora_gu, const LoraView &lora_dn,
                     const float *hf, const float *dguf, ThreadScratch &ts) {
    if (want.gate_up)
        lora_gate_up_grads(ex, s, plan, c, in, lora_gu, dguf, ts, s.db_gu + c.expert * 2 * ex.I * lora_gu.r);
    if (want.down) lora_down_grads(ex, s, plan, c, in, lora_dn, hf, ts, s.db_d + c.expert * ex.H * lora_dn.r);
}

void store_grads(const kt_experts &ex, const BackwardScratch &s, const kt_gradients &g, const LoraGrads &want,
                 const LoraView &lora_gu, const LoraView &lora_dn) {
    if (want.down && g.lora_down.dB) lora_db_from_engine(g.lora_down.dB, s.db_d, lora_dn, ex.E, ex.H);
    if (want.gate_up && g.lora_gate_up.dB) lora_db_from_engine(g.lora_gate_up.dB, s.db_gu, lora_gu, ex.E, 2 * ex.I);
}

template <typename F>
void for_expert_chunks(const RoutePlan &plan, int64_t e, F &&f) {
    for (int64_t r = 0; r < plan.count(e); r += kChunkRows)
        f(RowChunk{e, plan.offsets[e] + r, std::min(kChunkRows, plan.count(e) - r)});
}

// Stage 3, per expert (so that no two items write one expert's gradients): dw, dGU and TG = dGU B_gu
// (which dX needs), and the LoRA gradients `want` asks for from the same h and dGU rows.
// Experts without tokens only initialise their gradients.
void act_stage(const kt_experts &ex, const BackwardScratch &s, const RoutePlan &plan, const ActInputs &in,
               const LoraGrads &want, const LoraView &lora_gu, const LoraView &lora_dn) {
    const Kernels &K = *runtime().kernels;
    ThreadPool::run(ex.E, [&](int64_t i, int w) {
        const int64_t e = plan.order[i];
        ThreadScratch &ts = workspace().threads[w];
        begin_expert_grads(ex, s, *in.grads, want, e, lora_gu, lora_dn);
        for_expert_chunks(plan, e, [&](const RowChunk &c) {
            float *hf = ts.rows_a.get<float>(c.rows * ex.I);
            act_rows(ex, s, plan, c, in, hf);
            const float *dguf = lora_gu.r > 0 ? dgu_rows(ex, s, c, ts) : nullptr;
            if (lora_gu.r > 0)
                K.sgemm_nt(s.tg + c.row0 * lora_gu.r, lora_gu.r, dguf, 2 * ex.I,
                           s.bt.gu + c.expert * lora_gu.r * s.bt.n_gu, s.bt.n_gu, c.rows, lora_gu.r, 2 * ex.I, 1.0f,
                           false);
            lora_grads_rows(ex, s, plan, c, in, want, lora_gu, lora_dn, hf, dguf, ts);
        });
    });
    store_grads(ex, s, *in.grads, want, lora_gu, lora_dn);
}

}  // namespace

void backward_layer(const kt_experts &ex, const kt_gradients &grads, const uint16_t *dy, const uint16_t *x,
                    const RoutePlan &plan, const kt_saved_activations &saved, const LoraView &lora_gu,
                    const LoraView &lora_dn) {
    Workspace &ws = workspace();
    ws.ensure_threads(ThreadPool::size());
    if (grads.dw)
        for (int64_t route = 0; route < plan.T * plan.k; ++route) grads.dw[route] = 0.0f;
    const ActInputs in{x, &saved, &grads};
    const int64_t Nr = plan.rows();
    BackwardScratch s{};
    s.dys = ws.gathered.get<uint16_t>(Nr * ex.ldx);
    s.dgu = ws.gate_up.get<uint16_t>(Nr * ex.ldgu);
    s.g = ws.inter.get<float>(Nr * ex.Ip);
    s.tg = ws.lora_gate_up.get<float>(Nr * lora_gu.r + 1);
    s.ty = ws.lora_down.get<float>(Nr * lora_dn.r + 1);
    s.dx = grads.dx ? ws.routes.get<float>(plan.T * plan.k * ex.H + 1) : nullptr;
    s.db_d = ws.lora_db_down.get<float>(ex.E * ex.H * lora_dn.r + 1);
    s.db_gu = ws.lora_db_gate_up.get<float>(ex.E * 2 * ex.I * lora_gu.r + 1);
    s.bt = lora_b_to_engine(ex, lora_gu, lora_dn);
    const std::vector<RowChunk> chunks = row_chunks(plan);
    { StageTimer timer(KT_STAGE_BWD_GATHER); gather_stage(ex, s, dy, plan, chunks, lora_dn); }
    {
        StageTimer timer(KT_STAGE_BWD_DOWN_T);
        transposed_stage(ex, plan, true, s.dys, ex.ldx, s.ty, lora_dn, ex.I,
                         [&](int64_t row, int64_t c0, int64_t valid, const float *t) {
                             std::memcpy(s.g + row * ex.Ip + c0, t, sizeof(float) * valid);
                         });
    }
    {
        StageTimer timer(KT_STAGE_BWD_ACT);
        act_stage(ex, s, plan, in, LoraGrads(grads, lora_gu, lora_dn), lora_gu, lora_dn);
    }
    if (!grads.dx) return;
    {
        StageTimer timer(KT_STAGE_BWD_GATE_UP_T);
        transposed_stage(ex, plan, false, s.dgu, ex.ldgu, s.tg, lora_gu, ex.H,
                         [&](int64_t row, int64_t c0, int64_t valid, const float *t) {
                             std::memcpy(s.dx + plan.route[row] * ex.H + c0, t, sizeof(float) * valid);
                         });
    }
    { StageTimer timer(KT_STAGE_BWD_COMBINE); sum_routes(grads.dx, s.dx, plan, ex.H, false); }
}

}  // namespace kt
