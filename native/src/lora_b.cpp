// [NOTE] Why the LoRA B copies go through 16 x 16 blocks. In PEFT's layout the 16 outputs one
// item of the engine's layout needs are rows of B r*E floats apart (8 KiB for r 16, E 128): 16
// such lines fall into one L1 set, so reading them element by element, as a plain loop nest
// does, misses on nearly every load. A block is read into a local buffer one source line at a
// time and written out one destination line at a time: every line is touched once per block.
#include "lora_b.h"

#include <algorithm>
#include <cstdint>

#include <xmmintrin.h>

#include "thread_pool.h"
#include "workspace.h"

namespace kt {
namespace {

constexpr int64_t kBlock = 16;

// dst[j * dj + i * di] = src[i * si + j * sj] for i < rows, j < cols (rows, cols <= kBlock).
// Full, contiguous, aligned destination lines (the engine's layout, and PEFT's with the experts
// fastest) are written with streaming stores. A block's lines are r*N floats apart (96 KiB at
// Qwen3's shape): no hardware prefetcher follows them, so plain stores wait for each line to be
// read in first (write-allocate), and all of them fall into a few cache sets. Streaming stores
// write whole lines without reading them.
inline void transpose_f32_block(float *dst, int64_t dj, int64_t di, const float *src, int64_t si, int64_t sj,
                            int64_t rows, int64_t cols) {
    float buf[kBlock][kBlock];
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) buf[i][j] = src[i * si + j * sj];
    if (rows == kBlock && di == 1 && dj % 4 == 0 && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
        for (int64_t j = 0; j < cols; ++j) {
            alignas(16) float line[kBlock];
            for (int64_t i = 0; i < kBlock; ++i) line[i] = buf[i][j];
            for (int64_t i = 0; i < kBlock; i += 4) _mm_stream_ps(dst + j * dj + i, _mm_load_ps(line + i));
        }
        return;
    }
    for (int64_t j = 0; j < cols; ++j)
        for (int64_t i = 0; i < rows; ++i) dst[j * dj + i * di] = buf[i][j];
}

// The same over rows x cols of any size, in blocks.
void transpose(float *dst, int64_t dj, int64_t di, const float *src, int64_t si, int64_t sj, int64_t rows,
               int64_t cols) {
    for (int64_t i = 0; i < rows; i += kBlock)
        for (int64_t j = 0; j < cols; j += kBlock)
            transpose_f32_block(dst + j * dj + i * di, dj, di, src + i * si + j * sj, si, sj,
                            std::min(kBlock, rows - i), std::min(kBlock, cols - j));
    _mm_sfence();   // streaming stores are weakly ordered: visible before the pool's barrier releases readers
}

// bt[e][q][o] = B_e[o][q] for o < out, 0 for out <= o < N.
void convert(float *bt, const LoraView &l, int64_t E, int64_t out, int64_t N) {
    // One item: rank q, outputs [o0, o0 + 16) of every expert; it writes 64 bytes per (e, q) row.
    const int64_t blocks = (N + kBlock - 1) / kBlock;
    ThreadPool::run(l.r * blocks, [&](int64_t item, int) {
        const int64_t q = item / blocks, o0 = (item % blocks) * kBlock;
        const int64_t n = std::max<int64_t>(0, std::min(kBlock, out - o0));
        transpose(bt + q * N + o0, l.r * N, 1, l.B + o0 * l.so + q * l.sq, l.so, l.se, n, E);
        const int64_t pad = std::min(kBlock, N - o0) - n;
        if (pad > 0)
            for (int64_t e = 0; e < E; ++e) std::fill_n(bt + (e * l.r + q) * N + o0 + n, pad, 0.0f);
    });
}

}  // namespace

EngineLoraB lora_b_to_engine(const kt_experts &ex, const LoraView &lora_gu, const LoraView &lora_dn) {
    Workspace &ws = workspace();
    EngineLoraB b;
    b.n_gu = round_up(2 * ex.I, 16);
    b.n_d = round_up(ex.H, 16);
    b.gu = ws.lora_b_gate_up.get<float>(ex.E * lora_gu.r * b.n_gu + 1);
    b.d = ws.lora_b_down.get<float>(ex.E * lora_dn.r * b.n_d + 1);
    StageTimer timer(KT_STAGE_LORA_PREP);
    if (lora_gu.r) convert(b.gu, lora_gu, ex.E, 2 * ex.I, b.n_gu);
    if (lora_dn.r) convert(b.d, lora_dn, ex.E, ex.H, b.n_d);
    return b;
}

void lora_db_from_engine(float *dB, const float *dbt, const LoraView &l, int64_t E, int64_t out) {
    const int64_t blocks = (out + kBlock - 1) / kBlock;
    ThreadPool::run(l.r * blocks, [&](int64_t item, int) {
        const int64_t q = item / blocks, o0 = (item % blocks) * kBlock;
        transpose(dB + o0 * l.so + q * l.sq, l.so, l.se, dbt + q * out + o0, l.r * out, 1, E,
                  std::min(kBlock, out - o0));
    });
}

}  // namespace kt
