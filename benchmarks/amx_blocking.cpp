// Loop orders of the engine's AMX-BF16 GEMM item, timed side by side in one process.
//
//   g++ -O2 -march=sapphirerapids -pthread benchmarks/amx_blocking.cpp -o /tmp/amx_blocking
//   /tmp/amx_blocking [threads] [seconds per case]
//
// One work item as the engine's gate_up stage has it: C [M, 256] FP32 = A [M, K] BF16 . W^T, W = 16
// packed panels of 16 columns (the B-tile layout of pack.h), K = 2048, with the 2x2 tile step (2 A +
// 2 B tile loads, 4 TDPBF16PS). Variants differ in loop order, K slice, A row stride and the step:
//   band   (the engine's): per 128-row block, per K slice, per 32-row band, per panel pair
//   pairs  per 128-row block, per K slice, per panel pair, per band (the pair's B slice reused from L1)
//   _pad   A rows padded by 64 bytes (the engine's layout); without it they are 4 KiB apart
//   _sA / _sB   A or B tiles loaded with the non-temporal hint (TILELOADDT1)
//   _pipe  every tile register reloaded right after its last use (see kPipe)
// (The L1 prefetch variants of an earlier run, slower than none, are kept as flags.)
// Each thread computes its own items: "hot" reuses one W (L2-resident: the kernel's own ceiling),
// "cold" cycles through 48 MiB of W per thread (read from DRAM, as at T = 2048 where an expert has
// ~128 rows). Every variant's C is checked against a double-precision reference first.
// Prints one JSON line per case: GFLOPS per thread, aggregate TFLOPS, and W GB/s for "cold".
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "amx_study.h"

namespace {

constexpr int kN = 256, kK = 2048, kRowBlock = 128;

using amx_study::now;
using amx_study::pin;
using amx_study::tiles_on;

uint16_t to_bf16(float f) { uint32_t u; std::memcpy(&u, &f, 4); return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16); }
float from_bf16(uint16_t h) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// Variant flags of the step: L1 prefetches of the tiles two steps ahead (B only / A and B); tile
// loads with the non-temporal hint (TILELOADDT1) for B or for A; `kPipe`: each tile register is
// reloaded for the next step right after its last use in this one, so a load's latency overlaps the
// remaining TDPBF16PS of the step (matters when tile registers are not renamed).
enum Prefetch { kNone = 0, kB = 1, kAB = 3, kStreamB = 4, kStreamA = 8, kPipe = 16 };
constexpr int kAhead = 64;   // K elements ahead (two steps) that the prefetches reach

// Tile loads of A (row stride sa) and B (1 KiB contiguous); GCC's intrinsics need the register as
// a literal, hence macros.
#define KT_LOAD(stream, t, p, stride)                 \
    do {                                              \
        if (stream) _tile_stream_loadd(t, p, stride); \
        else _tile_loadd(t, p, stride);               \
    } while (0)
#define LOAD_A(t, p) KT_LOAD(pf & kStreamA, t, p, sa)
#define LOAD_B(t, p) KT_LOAD(pf & kStreamB, t, p, 64)

// C[32 x 32] (+)= A rows . panels W0, W1 over Kp (K slice), the engine's 2x2 step; `pf`: prefetch the
// tiles of the step kAhead further into L1 (B: 2 x 16 lines; A: 32 rows, one line each).
template <int pf>
inline void step_2x2(float *C, int ldc, const uint16_t *A, int lda, const uint16_t *W0, const uint16_t *W1, int Kp,
                     bool acc) {
    const int sa = lda * 2, sc = ldc * 4;
    float *C1 = C + 16 * ldc;
    const uint16_t *A1 = A + 16 * lda;
    if (acc) { _tile_loadd(0, C, sc); _tile_loadd(1, C + 16, sc); _tile_loadd(2, C1, sc); _tile_loadd(3, C1 + 16, sc); }
    else { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
    for (int k = 0; k < Kp; k += 32) {
        if (pf & kB)
            for (int l = 0; l < 16; ++l) {
                _mm_prefetch(reinterpret_cast<const char *>(W0 + (k + kAhead) * 16 + l * 32), _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char *>(W1 + (k + kAhead) * 16 + l * 32), _MM_HINT_T0);
            }
        if (pf & 2)
            for (int r = 0; r < 32; ++r) _mm_prefetch(reinterpret_cast<const char *>(A + r * lda + k + kAhead), _MM_HINT_T0);
        if (pf & kPipe) {
            if (k == 0) { LOAD_A(4, A); LOAD_B(6, W0); LOAD_B(7, W1); LOAD_A(5, A1); }
            const bool next = k + 32 < Kp;
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (next) LOAD_A(4, A + k + 32);
            _tile_dpbf16ps(2, 5, 6);
            if (next) LOAD_B(6, W0 + (k + 32) * 16);
            _tile_dpbf16ps(3, 5, 7);
            if (next) { LOAD_A(5, A1 + k + 32); LOAD_B(7, W1 + (k + 32) * 16); }
            continue;
        }
        LOAD_A(4, A + k);
        LOAD_B(6, W0 + k * 16);
        LOAD_B(7, W1 + k * 16);
        LOAD_A(5, A1 + k);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, C, sc); _tile_stored(1, C + 16, sc); _tile_stored(2, C1, sc); _tile_stored(3, C1 + 16, sc);
}

enum Order { kBand, kPairs };

// C [M, kN] = A [M, kK] . W^T; W: kN / 16 panels of stride kK * 16; M a multiple of 32.
template <int pf>
void item_pf(Order order, int ks, float *C, const uint16_t *A, int lda, const uint16_t *W, int M) {
    const int pst = kK * 16;
    for (int m0 = 0; m0 < M; m0 += kRowBlock) {
        const int mr = std::min(kRowBlock, M - m0);
        for (int k0 = 0; k0 < kK; k0 += ks) {
            if (order == kBand) {
                for (int b = m0; b < m0 + mr; b += 32)
                    for (int p = 0; p < kN / 16; p += 2)
                        step_2x2<pf>(C + b * kN + p * 16, kN, A + b * lda + k0, lda, W + p * pst + k0 * 16,
                                 W + (p + 1) * pst + k0 * 16, ks, k0 > 0);
            } else {
                for (int p = 0; p < kN / 16; p += 2)
                    for (int b = m0; b < m0 + mr; b += 32)
                        step_2x2<pf>(C + b * kN + p * 16, kN, A + b * lda + k0, lda, W + p * pst + k0 * 16,
                                 W + (p + 1) * pst + k0 * 16, ks, k0 > 0);
            }
        }
    }
}

void item(Order order, int ks, int pf, float *C, const uint16_t *A, int lda, const uint16_t *W, int M) {
    switch (pf) {
#define KT_CASE(v) case v: item_pf<v>(order, ks, C, A, lda, W, M); break;
        KT_CASE(kNone) KT_CASE(kB) KT_CASE(kAB) KT_CASE(kStreamB) KT_CASE(kStreamA) KT_CASE(kPipe)
        KT_CASE(kPipe | kStreamB)
#undef KT_CASE
        default: std::abort();
    }
}

// W[n][k] into panels: element (k, n) of panel n / 16 at (k / 2) * 32 + (n % 16) * 2 + k % 2.
void pack(uint16_t *out, const uint16_t *w) {
    for (int n = 0; n < kN; ++n)
        for (int k = 0; k < kK; ++k) out[(n / 16) * kK * 16 + (k / 2) * 32 + (n % 16) * 2 + k % 2] = w[n * kK + k];
}

// `pad`: A rows 64 bytes longer than K, as the engine's gathered rows are (ldx = Hp + 32): with
// lda = K = 2048 the 16 rows of an A tile are 4 KiB apart and share one L1 set.
struct Case {
    const char *name;
    Order order;
    int ks;
    int pf;
    bool pad;
};
const Case kCases[] = {{"band_k512", kBand, 512, kNone, false},          {"band_k512_pad", kBand, 512, kNone, true},
                       {"band_k512_pad_sB", kBand, 512, kStreamB, true}, {"band_k512_pad_sA", kBand, 512, kStreamA, true},
                       {"band_k512_pad_pipe", kBand, 512, kPipe, true},
                       {"band_k512_pad_pipe_sB", kBand, 512, kPipe | kStreamB, true},
                       {"pairs_k256_pad", kPairs, 256, kNone, true},     {"band_k256_pad", kBand, 256, kNone, true}};
int lda_of(const Case &c) { return c.pad ? kK + 32 : kK; }

// 64-byte aligned storage, as the engine's buffers are (tile rows never split cache lines).
template <typename T>
struct Buffer {
    T *p = nullptr;
    void assign(size_t n, T value) {
        std::free(p);
        p = static_cast<T *>(std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64));
        for (size_t i = 0; i < n; ++i) p[i] = value;
    }
    T *data() { return p; }
    ~Buffer() { std::free(p); }
};

struct Data {
    Buffer<uint16_t> a;   // [M, kK]
    Buffer<uint16_t> w;   // pool of packed W
    Buffer<float> c;
};

bool check(int M) {
    tiles_on();
    std::vector<uint16_t> a(size_t(M) * kK), w(size_t(kN) * kK);
    Buffer<uint16_t> packed;
    packed.assign(size_t(kN) * kK, 0);
    uint32_t s = 12345;
    auto rnd = [&] { s = s * 1664525u + 1013904223u; return float(int(s >> 9) % 2001 - 1000) / 1000.0f; };
    for (auto &x : a) x = to_bf16(rnd());
    for (auto &x : w) x = to_bf16(rnd());
    pack(packed.data(), w.data());
    std::vector<double> ref(size_t(M) * kN, 0.0);
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < kN; ++n) {
            double acc = 0;
            for (int k = 0; k < kK; ++k) acc += double(from_bf16(a[m * kK + k])) * from_bf16(w[n * kK + k]);
            ref[m * kN + n] = acc;
        }
    bool ok = true;
    for (const Case &c : kCases) {
        Buffer<float> out;
        out.assign(size_t(M) * kN, -1.0f);
        const int lda = lda_of(c);
        Buffer<uint16_t> ap;
        ap.assign(size_t(M) * lda, 0);
        for (int m = 0; m < M; ++m) std::memcpy(ap.p + size_t(m) * lda, a.data() + size_t(m) * kK, kK * 2);
        item(c.order, c.ks, c.pf, out.data(), ap.data(), lda, packed.data(), M);
        double err = 0, norm = 0;
            for (size_t i = 0; i < ref.size(); ++i) { err += (out.p[i] - ref[i]) * (out.p[i] - ref[i]); norm += ref[i] * ref[i]; }
        const double rel = std::sqrt(err / norm);
        if (rel > 1e-4) { std::printf("{\"check\": \"%s\", \"rel_l2\": %.3g, \"ok\": false}\n", c.name, rel); ok = false; }
    }
    _tile_release();
    return ok;
}

// Runs case c on `threads` threads for `seconds`; returns {items per thread, seconds}.
void run(const Case &c, int M, bool cold, int threads, double seconds) {
    const size_t wsize = size_t(kN) * kK;
    const int pool = cold ? int((48u << 20) / (wsize * 2)) : 1;
    std::vector<Data> data(threads);
    std::vector<long> items(threads, 0);
    std::vector<double> spent(threads, 0.0);
    std::atomic<int> ready{0};
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            pin(t);
            tiles_on();
            Data &d = data[t];   // first touch on the worker's own node
            d.a.assign(size_t(M) * lda_of(c), to_bf16(0.01f));
            d.w.assign(wsize * pool, to_bf16(0.02f));
            d.c.assign(size_t(M) * kN, 0.0f);
            item(c.order, c.ks, c.pf, d.c.data(), d.a.data(), lda_of(c), d.w.data(), M);   // warm-up
            ready.fetch_add(1);
            while (ready.load() < threads) {}
            long n = 0;
            const double t0 = now();
            double t1 = t0;
            while (t1 - t0 < seconds) {
                for (int i = 0; i < 8; ++i, ++n)
                    item(c.order, c.ks, c.pf, d.c.data(), d.a.data(), lda_of(c), d.w.data() + (n % pool) * wsize, M);
                t1 = now();
            }
            items[t] = n;
            spent[t] = t1 - t0;
            _tile_release();
        });
    for (auto &w : workers) w.join();
    double flops = 0, slowest = 0, wbytes = 0;
    for (int t = 0; t < threads; ++t) {
        flops += 2.0 * M * kN * kK * items[t];
        wbytes += double(wsize) * 2 * items[t];
        slowest = std::max(slowest, spent[t]);
    }
    std::printf("{\"case\": \"%s\", \"M\": %d, \"mode\": \"%s\", \"threads\": %d, \"gflops_per_thread\": %.1f, "
                "\"tflops\": %.3f, \"w_gbs\": %.1f}\n",
                c.name, M, cold ? "cold" : "hot", threads, flops / slowest / threads / 1e9, flops / slowest / 1e12,
                cold ? wbytes / slowest / 1e9 : 0.0);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char **argv) {
    const int threads = argc > 1 ? std::atoi(argv[1]) : 16;
    const double seconds = argc > 2 ? std::atof(argv[2]) : 0.5;
    if (!check(128)) return 1;
    std::printf("{\"check\": \"all\", \"ok\": true}\n");
    for (int round = 0; round < 3; ++round)   // interleaved: every case three times
        for (int M : {32, 128, 512})
            for (bool cold : {false, true})
                for (int tcount : {1, threads})
                    for (const Case &c : kCases) run(c, M, cold, tcount, seconds);
    return 0;
}
