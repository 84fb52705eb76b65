// Machine ceilings for the benchmarks, measured in the same run as the engine:
//   amx  <threads> <seconds>  register-resident TDPBF16PS loop (no memory traffic): AMX BF16 peak;
//                             then the engine's 2x2 tile step with its four tile loads from an
//                             L1-resident 32 KiB block: the ceiling a GEMM that loads its operands can reach
//   bf16dot <threads> <seconds>  register-resident VDPBF16PS loop (12 independent 512-bit accumulators):
//                             the AVX512-BF16 peak the avx512 path's gemm_bf16 is measured against
//   read <threads> <GiB>      AVX-512 streaming reads of a buffer much larger than the caches: DRAM bandwidth
// Prints one JSON line. Built by benchmarks/moe_layer.py with g++ at run time (x86-64 with AMX / AVX-512).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

struct TileConfig {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

static double amx_thread(double seconds) {
    TileConfig cfg{};
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    alignas(64) static thread_local uint16_t buf[16 * 32];
    _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    long iters = 0;
    const double t0 = now();
    while (now() - t0 < seconds) {
        for (int i = 0; i < 1000; ++i) {   // 4 independent accumulators hide the TDPBF16PS latency
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
        iters += 4000;
    }
    const double dt = now() - t0;
    _tile_release();
    return iters * 16.0 * 16 * 32 * 2 / dt;   // FLOP/s: 16x16 outputs x 32 products x 2
}

// C (2x2 tiles) += A (32 rows x 256 K) . B (2 panels x 256 K), both L1-resident, repeated: every
// step loads 2 A and 2 B tiles for 4 TDPBF16PS, as the engine's kernel does.
static double amx_l1_thread(double seconds) {
    TileConfig cfg{};
    cfg.palette = 1;
    for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
    _tile_loadconfig(&cfg);
    constexpr int K = 256;
    alignas(64) static thread_local uint16_t a[32 * K], b[2 * K * 16];
    for (int i = 0; i < 32 * K; ++i) a[i] = 0x3f80;   // 1.0
    for (int i = 0; i < 2 * K * 16; ++i) b[i] = 0x3c00;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    long steps = 0;
    const double t0 = now();
    while (now() - t0 < seconds) {
        for (int rep = 0; rep < 100; ++rep)
            for (int k = 0; k < K; k += 32) {
                _tile_loadd(4, a + k, K * 2);
                _tile_loadd(6, b + k * 16, 64);
                _tile_loadd(7, b + K * 16 + k * 16, 64);
                _tile_loadd(5, a + 16 * K + k, K * 2);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
        steps += 100 * (K / 32);
    }
    const double dt = now() - t0;
    _tile_release();
    return steps * 4 * 16.0 * 16 * 32 * 2 / dt;
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16dot_thread(double seconds) {
    __m512 acc[12];
    for (auto &a : acc) a = _mm512_setzero_ps();
    const __m512bh w = (__m512bh)_mm512_set1_epi32(0x3f803f80), x = (__m512bh)_mm512_set1_epi32(0x3c003c00);
    long ops = 0;
    const double t0 = now();
    while (now() - t0 < seconds) {
        for (int i = 0; i < 100000; ++i) {
#pragma GCC unroll 12
            for (int j = 0; j < 12; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], w, x);   // kept in registers
        }
        ops += 1200000;
    }
    const double dt = now() - t0;
    float sink = 0;
    for (auto &a : acc) sink += _mm512_reduce_add_ps(a);
    return ops * 64.0 / dt + (sink == 12345.0f);   // FLOP/s: 16 lanes x 2 products x 2
}

static double read_thread(const float *p, size_t n, int reps) {
    __m512 acc = _mm512_setzero_ps();
    for (int r = 0; r < reps; ++r)
        for (size_t i = 0; i < n; i += 64) {
            acc = _mm512_add_ps(acc, _mm512_load_ps(p + i));
            acc = _mm512_add_ps(acc, _mm512_load_ps(p + i + 16));
            acc = _mm512_add_ps(acc, _mm512_load_ps(p + i + 32));
            acc = _mm512_add_ps(acc, _mm512_load_ps(p + i + 48));
        }
    return _mm512_reduce_add_ps(acc);
}

int main(int argc, char **argv) {
    if (argc < 4) { std::fprintf(stderr, "usage: ceilings amx|bf16dot|read threads value\n"); return 2; }
    const int threads = std::atoi(argv[2]);
    std::vector<std::thread> pool;
    if (!std::strcmp(argv[1], "amx")) {
        if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) { std::printf("{\"error\": \"AMX not permitted\"}\n"); return 1; }
        const double seconds = std::atof(argv[3]);
        std::vector<double> flops(threads);
        for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { flops[t] = amx_thread(seconds); });
        for (auto &th : pool) th.join();
        double total = 0; for (double f : flops) total += f;
        pool.clear();
        std::vector<double> l1(threads);
        for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { l1[t] = amx_l1_thread(seconds); });
        for (auto &th : pool) th.join();
        double total_l1 = 0; for (double f : l1) total_l1 += f;
        std::printf("{\"amx_peak_tflops\": %.3f, \"amx_peak_tflops_1thread\": %.3f, \"amx_l1_tflops\": %.3f, "
                    "\"threads\": %d}\n", total / 1e12, flops[0] / 1e12, total_l1 / 1e12, threads);
    } else if (!std::strcmp(argv[1], "bf16dot")) {
        if (!__builtin_cpu_supports("avx512bf16")) { std::printf("{\"error\": \"no AVX512-BF16\"}\n"); return 1; }
        const double seconds = std::atof(argv[3]);
        std::vector<double> flops(threads);
        for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { flops[t] = bf16dot_thread(seconds); });
        for (auto &th : pool) th.join();
        double total = 0; for (double f : flops) total += f;
        std::printf("{\"avx512_bf16_peak_tflops\": %.3f, \"avx512_bf16_peak_tflops_1thread\": %.3f}\n", total / 1e12,
                    flops[0] / 1e12);
    } else {
        const size_t bytes = static_cast<size_t>(std::atof(argv[3]) * (1 << 30));
        const size_t per = bytes / threads / 256 * 256;
        std::vector<float *> bufs(threads);
        for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] {
            bufs[t] = static_cast<float *>(std::aligned_alloc(64, per));
            std::memset(bufs[t], 1, per);
        });
        for (auto &th : pool) th.join();
        pool.clear();
        std::atomic<double> sink{0};
        const int reps = 3;
        const double t0 = now();
        for (int t = 0; t < threads; ++t) pool.emplace_back([&, t] { sink = sink + read_thread(bufs[t], per / 4, reps); });
        for (auto &th : pool) th.join();
        const double dt = now() - t0;
        std::printf("{\"dram_read_gbs\": %.1f, \"threads\": %d, \"sink\": %g}\n", per * threads * reps / dt / 1e9, threads, (double)sink);
    }
    return 0;
}
