// Where the AMX-BF16 tile step's operands come from, and what it costs: the engine's 2x2 step
// (2 A + 2 B tile loads, 4 TDPBF16PS, C kept in tiles) with A and B each streamed from a region
// that fits L1 (16 KiB), L2 (512 KiB) or neither (64 MiB), every thread on its own buffers.
//
//   g++ -O2 -march=sapphirerapids -pthread benchmarks/amx_operands.cpp -o /tmp/amx_operands
//   /tmp/amx_operands [threads] [seconds per case]
//
// A tiles are 16 rows of a padded matrix (row stride 4160 bytes, as the engine's gathered rows),
// walked along K and then to the next 32-row band; B tiles are 1 KiB contiguous, as packed panels
// are. Operands hold BF16 values in [2^-7, 2^-6] (no zeros or denormals, which TDPBF16PS may
// treat faster). Prints one JSON line per case: TFLOPS per thread and aggregate. The L1/L1 case
// is the step's own ceiling; the others show which placement the GEMM loops must reach.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "amx_study.h"

namespace {

using amx_study::now;
using amx_study::pin;
using amx_study::tiles_on;

constexpr int64_t kRowBytes = 4160;   // 2048 BF16 of K + 64 bytes of padding
constexpr int64_t kKBytes = 4096;
struct Place { const char *name; size_t bytes; };
constexpr Place kPlaces[] = {{"L1", 16 << 10}, {"L2", 512 << 10}, {"DRAM", size_t(64) << 20}};

// `steps` 2x2 steps; A from a region of `a_bytes` (bands of 32 rows), B from one of `b_bytes`.
void steps_2x2(const char *A, size_t a_bytes, const char *B, size_t b_bytes, long steps) {
    // A small region holds one band of 32 rows and part of K; a large one holds whole rows.
    const int64_t k_bytes = a_bytes >= size_t(32 * kRowBytes) ? kKBytes : int64_t(a_bytes / (32 * 64)) * 64;
    const int64_t row_bytes = a_bytes >= size_t(32 * kRowBytes) ? kRowBytes : k_bytes;
    const int64_t bands = std::max<int64_t>(1, int64_t(a_bytes) / (32 * row_bytes));
    int64_t band = 0, kc = 0;
    size_t b_off = 0;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (long s = 0; s < steps; ++s) {
        const char *a0 = A + band * 32 * row_bytes + kc, *a1 = a0 + 16 * row_bytes;
        _tile_loadd(4, a0, row_bytes);
        _tile_loadd(6, B + b_off, 64);
        _tile_loadd(7, B + b_off + 1024, 64);
        _tile_loadd(5, a1, row_bytes);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        kc += 64;
        if (kc >= k_bytes) { kc = 0; band = (band + 1) % bands; }
        b_off += 2048;
        if (b_off + 2048 > b_bytes) b_off = 0;
    }
}

char *filled(size_t bytes) {
    auto *p = static_cast<uint16_t *>(std::aligned_alloc(4096, bytes));
    for (size_t i = 0; i < bytes / 2; ++i) p[i] = uint16_t(0x3c00 + i % 127);   // BF16 in [2^-7, 2^-6)
    return reinterpret_cast<char *>(p);
}

void run(const Place &a, const Place &b, int threads, double seconds) {
    std::vector<double> tflops(threads, 0.0);
    std::atomic<int> ready{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            pin(t);
            tiles_on();
            char *A = filled(a.bytes), *B = filled(b.bytes);   // first touch on the worker's node
            steps_2x2(A, a.bytes, B, b.bytes, 20000);          // warm-up
            ready.fetch_add(1);
            while (ready.load() < threads) {}
            const long chunk = 20000;
            long n = 0;
            const double t0 = now();
            double t1 = t0;
            while (t1 - t0 < seconds) {
                steps_2x2(A, a.bytes, B, b.bytes, chunk);
                n += chunk;
                t1 = now();
            }
            tflops[t] = n * 4.0 * 16 * 16 * 32 * 2 / (t1 - t0) / 1e12;
            _tile_release();
            std::free(A);
            std::free(B);
        });
    for (auto &w : workers) w.join();
    double total = 0;
    for (double v : tflops) total += v;
    std::printf("{\"a\": \"%s\", \"b\": \"%s\", \"threads\": %d, \"tflops_per_thread\": %.3f, \"tflops\": %.3f}\n",
                a.name, b.name, threads, total / threads, total);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char **argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 16;
    const double seconds = argc > 2 ? std::atof(argv[2]) : 0.3;
    for (int round = 0; round < 3; ++round)   // interleaved: every case three times
        for (int tcount : {1, threads})
            for (const Place &a : kPlaces)
                for (const Place &b : kPlaces) run(a, b, tcount, seconds);
    return 0;
}
