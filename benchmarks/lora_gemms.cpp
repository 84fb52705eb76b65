// The engine's FP32 LoRA GEMMs (sgemm.inc, AVX-512 build) at the shapes one Qwen3-30B-A3B layer
// gives them per 32-row chunk (r 16), with their operands in cache, against a register-resident
// FMA loop on the same thread: how close the kernels run to the core's FP32 peak when memory is
// not in the way (the backward's bwd_act stage runs them between memory-bound parts).
//
//   g++ -O3 -std=c++17 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma \
//       -Inative/src/kernels -Inative/include benchmarks/lora_gemms.cpp -o /tmp/lora_gemms
//   /tmp/lora_gemms
//
// One JSON line per shape (microseconds a call, GFLOPS, fraction of the FMA peak), then the peak.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

#include "avx512_common.h"

namespace {

using Clock = std::chrono::steady_clock;

template <class F>
double best_seconds(F &&f, int reps) {
    double best = 1e30;
    for (int r = 0; r < reps; ++r) {
        const auto t = Clock::now();
        f();
        best = std::min(best, std::chrono::duration<double>(Clock::now() - t).count());
    }
    return best;
}

// 12 independent FMA chains in named registers (an array of them is spilled each step): the
// thread's FP32 peak.
double peak_gflops() {
    const long rounds = 20000000;
    const __m512 m = _mm512_set1_ps(0.5f), d = _mm512_set1_ps(1.0f);
    // distinct starting values: identical chains would be merged into one by the compiler
#define KT_START(j) _mm512_set1_ps(1.0f + (j) / 16.0f)
    __m512 a0 = KT_START(0), a1 = KT_START(1), a2 = KT_START(2), a3 = KT_START(3), a4 = KT_START(4),
           a5 = KT_START(5), a6 = KT_START(6), a7 = KT_START(7), a8 = KT_START(8), a9 = KT_START(9),
           a10 = KT_START(10), a11 = KT_START(11);
#undef KT_START
    const auto t = Clock::now();
    for (long i = 0; i < rounds; ++i) {
#define KT_FMA(a) a = _mm512_fmadd_ps(a, m, d)
        KT_FMA(a0); KT_FMA(a1); KT_FMA(a2); KT_FMA(a3); KT_FMA(a4); KT_FMA(a5);
        KT_FMA(a6); KT_FMA(a7); KT_FMA(a8); KT_FMA(a9); KT_FMA(a10); KT_FMA(a11);
#undef KT_FMA
    }
    const double s = std::chrono::duration<double>(Clock::now() - t).count();
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                     _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
    const __m512 rest = _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11));
    const float sink = _mm512_reduce_add_ps(_mm512_add_ps(sum, rest));
    return 2.0 * 16 * 12 * rounds / s / 1e9 + (sink == 12345.0f);
}

struct Shape {
    const char *name;
    char kind;   // 't' sgemm_tn (dA, dB), 'n' sgemm_nt (x A^T, dY B), 'm' sgemm_nn (L Bt into an output block)
    int64_t M, N, K;
};

}  // namespace

int main() {
    using namespace kt::avx512;
    std::mt19937 gen(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::vector<float> A(64 * 4096), B(64 * 4096), C(64 * 4096);
    for (auto *v : {&A, &B, &C})
        for (float &x : *v) x = u(gen);
    const double peak = peak_gflops();
    const Shape shapes[] = {{"dA_gate_up (tn 16x2048, K 32)", 't', 16, 2048, 32},
                            {"dB_gate_up (tn 16x1536, K 32)", 't', 16, 1536, 32},
                            {"dA_down (tn 16x768, K 32)", 't', 16, 768, 32},
                            {"TG = dGU B_gu (nt 32x16, K 1536)", 'n', 32, 16, 1536},
                            {"TY = dY B_d (nt 32x16, K 2048)", 'n', 32, 16, 2048},
                            {"LH = h A_d^T (nt 32x16, K 768)", 'n', 32, 16, 768},
                            {"L Bt into a block (nn 32x256, K 16)", 'm', 32, 256, 16}};
    for (const Shape &s : shapes) {
        const int calls = 200;
        const double sec = best_seconds([&] {
            for (int c = 0; c < calls; ++c) {
                if (s.kind == 't') sgemm_tn(C.data(), s.N, A.data(), s.M, B.data(), s.N, s.M, s.N, s.K, 1.0f, true);
                else if (s.kind == 'n')
                    sgemm_nt(C.data(), s.N, A.data(), s.K, B.data(), s.K, s.M, s.N, s.K, 1.0f, false);
                else sgemm_nn(C.data(), s.N, A.data(), s.K, B.data(), s.N, s.M, s.N, s.K, 1.0f, true);
            }
        }, 20);
        const double gflops = 2.0 * s.M * s.N * s.K * calls / sec / 1e9;
        std::printf("{\"kind\": \"lora_gemm\", \"shape\": \"%s\", \"us_per_call\": %.2f, \"gflops\": %.1f, "
                    "\"fraction_of_fma_peak\": %.3f}\n", s.name, sec / calls * 1e6, gflops, gflops / peak);
    }
    std::printf("{\"kind\": \"fma_peak\", \"gflops\": %.1f}\n", peak);
}
