// Kernel self-test: every ISA table whose CPU features are present, against the scalar oracle.
//
//   gemm_bf16, sgemm_*: ragged shapes, strides larger than needed, accumulate on/off; tolerance
//     for FP32 accumulation-order differences: |d| <= 1e-5 * (sum |terms| + |C0|) + 1e-6.
//     The scalar oracle itself is checked against a double-precision reference with the same bound.
//     Padding of A (columns Kp..lda) holds NaN and padding of C (columns N..ldc) a sentinel:
//     reading the first or writing the second fails the case.
//   bf16_to_f32, f32_to_bf16: bit-exact (all 65536 BF16 patterns; random and special FP32 bits).
//
// Prints one line per ISA x kernel and "N passed, M failed"; exits non-zero on failure.
// Usage: kt_kernels_selftest [--bench]   (--bench adds gemm_bf16 GFLOP/s per ISA)
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bf16.h"
#include "cpu_features.h"
#include "kernels.h"
#include "kt_trl.h"

namespace {

using kt::Kernels;

constexpr float kSentinel = 1234.5f;
constexpr uint16_t kBf16NaN = 0x7fc0;

std::mt19937_64 rng(12345);

float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
uint16_t random_bf16() { return kt::float_to_bf16(uniform(-1.0f, 1.0f)); }

// Worst result of one ISA x kernel over all its cases.
struct Stats {
    int passed = 0, failed = 0;
    double max_abs = 0.0;     // max |ours - oracle|
    double max_ratio = 0.0;   // max |ours - oracle| / tolerance (gemms); mismatching values (conversions)
    std::string first_failure;
};

int g_passed = 0, g_failed = 0;

void record(Stats &s, bool ok, const std::string &what) {
    if (ok) { ++s.passed; ++g_passed; return; }
    ++s.failed; ++g_failed;
    if (s.first_failure.empty()) s.first_failure = what;
}

void print(const char *isa, const char *kernel, const Stats &s, bool bit_exact) {
    if (bit_exact)
        std::printf("%-7s %-12s cases %4d  bit-exact mismatches %-8.0f %s\n", isa, kernel, s.passed + s.failed,
                    s.max_ratio, s.failed ? "FAIL" : "ok");
    else
        std::printf("%-7s %-12s cases %4d  max|d| %-10.3g max|d|/tol %-8.3g %s\n", isa, kernel, s.passed + s.failed,
                    s.max_abs, s.max_ratio, s.failed ? "FAIL" : "ok");
    if (s.failed) std::printf("        first failure: %s\n", s.first_failure.c_str());
}

// Compares got[m * ld + n] with want over M x N; padding columns N..ld-1 of all but the last row
// must still hold kSentinel (the buffers are exactly (M - 1) * ld + N long).
bool compare(const std::vector<float> &got, const std::vector<float> &want, const std::vector<double> &scale,
             int64_t M, int64_t N, int64_t ld, Stats &s) {
    bool ok = true;
    for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < N; ++n) {
            const double d = std::fabs(double(got[m * ld + n]) - double(want[m * ld + n]));
            const double tol = 1e-5 * scale[m * N + n] + 1e-6;
            if (!(d <= tol)) ok = false;   // NaN fails too
            if (d > s.max_abs || std::isnan(d)) s.max_abs = std::isnan(d) ? INFINITY : d;
            if (d / tol > s.max_ratio || std::isnan(d)) s.max_ratio = std::isnan(d) ? INFINITY : d / tol;
        }
        if (m + 1 < M)
            for (int64_t n = N; n < ld; ++n)
                if (got[m * ld + n] != kSentinel) ok = false;
    }
    return ok;
}

// ---------------------------------------------------------------- gemm_bf16

struct GemmCase {
    int64_t M, N, Kp, lda, ldc;
    bool accumulate;
    std::vector<uint16_t> A, Wp;
    std::vector<float> C0, oracle;
    std::vector<double> scale;   // sum_k |A W| + |C0| per output
    std::string name;
};

// W[n, k] read through the packed layout of pack.h.
uint16_t packed_at(const std::vector<uint16_t> &Wp, int64_t Kp, int64_t n, int64_t k) {
    return Wp[(n / 16) * Kp * 16 + (k / 2) * 32 + (n % 16) * 2 + (k % 2)];
}

GemmCase make_gemm(int64_t M, int64_t N, int64_t Kp, bool accumulate) {
    GemmCase g{M, N, Kp, Kp + 8 + (M % 3) * 3, N + 5, accumulate, {}, {}, {}, {}, {}, {}};
    g.A.assign((M - 1) * g.lda + Kp, kBf16NaN);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < Kp; ++k) g.A[m * g.lda + k] = random_bf16();
    g.Wp.resize(N * Kp);
    for (auto &w : g.Wp) w = random_bf16();
    g.C0.assign((M - 1) * g.ldc + N, kSentinel);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) g.C0[m * g.ldc + n] = uniform(-1.0f, 1.0f);
    g.scale.resize(M * N);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double s = accumulate ? std::fabs(g.C0[m * g.ldc + n]) : 0.0;
            for (int64_t k = 0; k < Kp; ++k)
                s += std::fabs(double(kt::bf16_to_float(g.A[m * g.lda + k])) *
                               kt::bf16_to_float(packed_at(g.Wp, Kp, n, k)));
            g.scale[m * N + n] = s;
        }
    char buf[128];
    std::snprintf(buf, sizeof buf, "M=%" PRId64 " N=%" PRId64 " Kp=%" PRId64 " lda=%" PRId64 " ldc=%" PRId64 " acc=%d",
                  M, N, Kp, g.lda, g.ldc, int(accumulate));
    g.name = buf;
    return g;
}

std::vector<float> run_gemm(const Kernels &k, const GemmCase &g) {
    std::vector<float> C = g.C0;
    k.gemm_bf16(C.data(), g.ldc, g.A.data(), g.lda, g.Wp.data(), g.Kp * 16, g.M, g.N, g.Kp, g.accumulate);
    return C;
}

// The K-slice [32, Kp) of the same panels (panel stride stays Kp * 16), as the drivers call it.
std::vector<float> run_gemm_slice(const Kernels &k, const GemmCase &g) {
    std::vector<float> C = g.C0;
    k.gemm_bf16(C.data(), g.ldc, g.A.data() + 32, g.lda, g.Wp.data() + 32 * 16, g.Kp * 16, g.M, g.N, g.Kp - 32,
                g.accumulate);
    return C;
}

// Double-precision reference, to check the oracle itself.
std::vector<float> reference_gemm(const GemmCase &g) {
    std::vector<float> C = g.C0;
    for (int64_t m = 0; m < g.M; ++m)
        for (int64_t n = 0; n < g.N; ++n) {
            double s = g.accumulate ? g.C0[m * g.ldc + n] : 0.0;
            for (int64_t k = 0; k < g.Kp; ++k)
                s += double(kt::bf16_to_float(g.A[m * g.lda + k])) * kt::bf16_to_float(packed_at(g.Wp, g.Kp, n, k));
            C[m * g.ldc + n] = float(s);
        }
    return C;
}

void test_gemm(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    const int64_t Ms[] = {1, 3, 15, 16, 17, 31, 32, 33, 100};
    const int64_t Ns[] = {16, 32, 48, 64, 80, 112};
    const int64_t Kps[] = {32, 64, 96, 2048};
    for (int64_t Kp : Kps)
        for (int64_t M : Ms)
            for (int64_t N : Ns)
                for (bool acc : {false, true}) {
                    GemmCase g = make_gemm(M, N, Kp, acc);
                    g.oracle = run_gemm(*isas[0], g);
                    const bool small = M * N * Kp <= 33 * 48 * 96;   // the double reference is slow
                    if (small || (M <= 17 && N <= 32))
                        record(stats[0], compare(g.oracle, reference_gemm(g), g.scale, M, N, g.ldc, stats[0]), g.name);
                    for (size_t i = 1; i < isas.size(); ++i)
                        record(stats[i], compare(run_gemm(*isas[i], g), g.oracle, g.scale, M, N, g.ldc, stats[i]),
                               g.name);
                    if (Kp < 64) continue;
                    const std::vector<float> slice = run_gemm_slice(*isas[0], g);
                    for (size_t i = 1; i < isas.size(); ++i)
                        record(stats[i], compare(run_gemm_slice(*isas[i], g), slice, g.scale, M, N, g.ldc, stats[i]),
                               g.name + " k-slice");
                }
}

// ---------------------------------------------------------------- sgemm_*

enum SgemmOp { kNT, kNN, kTN };

struct SgemmCase {
    SgemmOp op;
    int64_t M, N, K, lda, ldb, ldc;
    float alpha;
    bool accumulate;
    std::vector<float> A, B, C0, oracle;
    std::vector<double> scale;
    std::string name;
};

// op(A)[m, k] and op(B)[k, n] for the three layouts of kernels.h.
float a_at(const SgemmCase &s, int64_t m, int64_t k) { return s.op == kTN ? s.A[k * s.lda + m] : s.A[m * s.lda + k]; }
float b_at(const SgemmCase &s, int64_t k, int64_t n) { return s.op == kNT ? s.B[n * s.ldb + k] : s.B[k * s.ldb + n]; }

std::vector<float> random_matrix(int64_t rows, int64_t cols, int64_t ld) {
    std::vector<float> v((rows - 1) * ld + cols, NAN);   // padding NaN: must never be read
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) v[r * ld + c] = uniform(-1.0f, 1.0f);
    return v;
}

SgemmCase make_sgemm(SgemmOp op, int64_t M, int64_t N, int64_t K, float alpha, bool accumulate) {
    SgemmCase s{op, M, N, K, 0, 0, N + 3, alpha, accumulate, {}, {}, {}, {}, {}, {}};
    const int64_t arows = op == kTN ? K : M, acols = op == kTN ? M : K;
    const int64_t brows = op == kNT ? N : K, bcols = op == kNT ? K : N;
    s.lda = acols + 5;
    s.ldb = bcols + 2;
    s.A = random_matrix(arows, acols, s.lda);
    s.B = random_matrix(brows, bcols, s.ldb);
    s.C0.assign((M - 1) * s.ldc + N, kSentinel);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) s.C0[m * s.ldc + n] = uniform(-1.0f, 1.0f);
    s.scale.resize(M * N);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
            double t = 0.0;
            for (int64_t k = 0; k < K; ++k) t += std::fabs(double(a_at(s, m, k)) * b_at(s, k, n));
            s.scale[m * N + n] = std::fabs(alpha) * t + (accumulate ? std::fabs(s.C0[m * s.ldc + n]) : 0.0);
        }
    char buf[160];
    std::snprintf(buf, sizeof buf, "M=%" PRId64 " N=%" PRId64 " K=%" PRId64 " lda=%" PRId64 " ldb=%" PRId64
                  " ldc=%" PRId64 " alpha=%g acc=%d", M, N, K, s.lda, s.ldb, s.ldc, double(alpha), int(accumulate));
    s.name = buf;
    return s;
}

std::vector<float> run_sgemm(const Kernels &k, const SgemmCase &s) {
    std::vector<float> C = s.C0;
    auto fn = s.op == kNT ? k.sgemm_nt : s.op == kNN ? k.sgemm_nn : k.sgemm_tn;
    fn(C.data(), s.ldc, s.A.data(), s.lda, s.B.data(), s.ldb, s.M, s.N, s.K, s.alpha, s.accumulate);
    return C;
}

std::vector<float> reference_sgemm(const SgemmCase &s) {
    std::vector<float> C = s.C0;
    for (int64_t m = 0; m < s.M; ++m)
        for (int64_t n = 0; n < s.N; ++n) {
            double t = 0.0;
            for (int64_t k = 0; k < s.K; ++k) t += double(a_at(s, m, k)) * b_at(s, k, n);
            C[m * s.ldc + n] = float(s.alpha * t + (s.accumulate ? s.C0[m * s.ldc + n] : 0.0));
        }
    return C;
}

void test_sgemm(SgemmOp op, const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    const int64_t Ms[] = {1, 3, 16, 17, 33};
    const int64_t Ns[] = {1, 5, 16, 33, 64};
    const int64_t Ks[] = {1, 7, 16, 65, 300};
    for (int64_t M : Ms)
        for (int64_t N : Ns)
            for (int64_t K : Ks)
                for (int variant = 0; variant < 3; ++variant) {
                    const float alpha = variant == 2 ? -0.375f : 1.0f;
                    SgemmCase s = make_sgemm(op, M, N, K, alpha, variant != 0);
                    s.oracle = run_sgemm(*isas[0], s);
                    record(stats[0], compare(s.oracle, reference_sgemm(s), s.scale, M, N, s.ldc, stats[0]), s.name);
                    for (size_t i = 1; i < isas.size(); ++i)
                        record(stats[i], compare(run_sgemm(*isas[i], s), s.oracle, s.scale, M, N, s.ldc, stats[i]),
                               s.name);
                }
}

// ---------------------------------------------------------------- conversions

// Lengths and start offsets that exercise full vectors, tails and unaligned pointers.
const int64_t kLens[] = {0, 1, 2, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 100, 1000, 4099};
const int64_t kOffsets[] = {0, 1, 3};

void test_bf16_to_f32(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    std::vector<uint16_t> src(65536 + 8);
    for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint16_t>(i * 40503u);   // all patterns
    std::vector<float> want(src.size());
    for (size_t i = 0; i < src.size(); ++i) want[i] = kt::bf16_to_float(src[i]);
    for (size_t i = 0; i < isas.size(); ++i) {
        auto one = [&](int64_t off, int64_t n) {
            std::vector<float> got(n + 1, kSentinel);   // one guard element past the end
            isas[i]->bf16_to_f32(got.data(), src.data() + off, n);
            int64_t bad = std::memcmp(got.data(), want.data() + off, n * sizeof(float)) != 0;
            bad += got[n] != kSentinel;
            stats[i].max_ratio = std::max(stats[i].max_ratio, double(bad));
            record(stats[i], bad == 0, "bf16_to_f32 off=" + std::to_string(off) + " n=" + std::to_string(n));
        };
        for (int64_t off : kOffsets)
            for (int64_t n : kLens) one(off, n);
        one(0, 65536 + 8);
    }
}

std::vector<float> conversion_inputs() {
    const uint32_t special[] = {
        0x00000000, 0x80000000, 0x00000001, 0x807fffff, 0x007fffff, 0x00008000, 0x00018000, 0x00017fff,
        0x3f808000, 0x3f818000, 0x3f807fff, 0x3f80ffff, 0x7f7fffff, 0xff7fffff, 0x7f7f8000, 0x7f7f7fff,
        0x7f800000, 0xff800000, 0x7f800001, 0xff800001, 0x7fc00000, 0xffc00000, 0x7fbfffff, 0x7f80ffff,
        0x7fff0000, 0x7fffffff, 0xffffffff, 0x7f810000, 0x3f800000, 0xbf800000, 0x40490fdb, 0x00800000};
    std::vector<float> v;
    for (uint32_t b : special) {
        float f;
        std::memcpy(&f, &b, 4);
        v.push_back(f);
    }
    std::uniform_int_distribution<uint32_t> bits;
    for (int i = 0; i < 200000; ++i) {   // random bit patterns, then ties and near-ties
        uint32_t b = bits(rng);
        if (i % 4 == 1) b = (b & 0xffff0000u) | 0x8000u;
        if (i % 4 == 2) b = (b & 0xffff0000u) | (0x7fffu + (b & 2u));
        float f;
        std::memcpy(&f, &b, 4);
        v.push_back(f);
    }
    return v;
}

void test_f32_to_bf16(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    const std::vector<float> src = conversion_inputs();
    std::vector<uint16_t> want(src.size());
    for (size_t i = 0; i < src.size(); ++i) want[i] = kt::float_to_bf16(src[i]);
    for (size_t i = 0; i < isas.size(); ++i) {
        auto one = [&](int64_t off, int64_t n) {
            std::vector<uint16_t> got(n + 1, 0xabcd);
            isas[i]->f32_to_bf16(got.data(), src.data() + off, n);
            int64_t bad = got[n] != 0xabcd;
            for (int64_t j = 0; j < n; ++j) bad += got[j] != want[off + j];
            stats[i].max_ratio = std::max(stats[i].max_ratio, double(bad));
            record(stats[i], bad == 0, "f32_to_bf16 off=" + std::to_string(off) + " n=" + std::to_string(n));
        };
        for (int64_t off : kOffsets)
            for (int64_t n : kLens) one(off, n);
        one(0, static_cast<int64_t>(src.size()));
    }
}

// ---------------------------------------------------------------- driver

std::vector<const Kernels *> available_isas() {
    const uint32_t f = kt::cpu_features();
    const uint32_t avx2 = KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C;
    const uint32_t avx512 = KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL | KT_CPU_AVX512BF16;
    const uint32_t amx = avx512 | KT_CPU_AMX_TILE | KT_CPU_AMX_BF16 | KT_CPU_AMX_PERMITTED;
    std::printf("cpu features 0x%x\n", f);
    std::vector<const Kernels *> isas = {&kt::kernels_scalar};
    if ((f & avx2) == avx2) isas.push_back(&kt::kernels_avx2);
    else std::printf("avx2    skipped: CPU lacks AVX2/FMA/F16C\n");
    if ((f & avx512) == avx512) isas.push_back(&kt::kernels_avx512);
    else std::printf("avx512  skipped: CPU lacks AVX-512F/BW/VL/BF16\n");
    if ((f & amx) == amx && kt::amx_thread_init()) isas.push_back(&kt::kernels_amx);
    else std::printf("amx     skipped: CPU lacks AMX-BF16/AVX-512, or no AMX permission\n");
    return isas;
}

void bench(const std::vector<const Kernels *> &isas) {
    const int64_t shapes[][3] = {{32, 64, 2048}, {64, 64, 7168}, {16, 64, 768}};
    for (const auto &sh : shapes) {
        GemmCase g = make_gemm(sh[0], sh[1], sh[2], false);
        for (const Kernels *k : isas) {
            std::vector<float> C = g.C0;
            const double flops = 2.0 * g.M * g.N * g.Kp;
            k->gemm_bf16(C.data(), g.ldc, g.A.data(), g.lda, g.Wp.data(), g.Kp * 16, g.M, g.N, g.Kp, false);   // warm-up
            int64_t reps = 0;
            double total = 0.0;
            const auto t0 = std::chrono::steady_clock::now();
            while (total < 0.25) {   // at least 0.25 s of calls
                k->gemm_bf16(C.data(), g.ldc, g.A.data(), g.lda, g.Wp.data(), g.Kp * 16, g.M, g.N, g.Kp, false);
                ++reps;
                total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            }
            const double secs = total / reps;
            std::printf("bench   %-7s gemm_bf16 M=%-3" PRId64 " N=%-3" PRId64 " Kp=%-5" PRId64 " %8.1f GFLOP/s\n",
                        k->name, g.M, g.N, g.Kp, flops / secs * 1e-9);
        }
    }
    // As the drivers call it: 128 rows x 256 columns, K in slices of 512 (driver.h).
    const int64_t sliced[][3] = {{128, 256, 2048}, {128, 256, 768}};
    for (const auto &sh : sliced) {
        GemmCase g = make_gemm(sh[0], sh[1], sh[2], false);
        for (const Kernels *k : isas) {
            std::vector<float> C = g.C0;
            auto call = [&] {
                for (int64_t k0 = 0; k0 < g.Kp; k0 += 512)
                    k->gemm_bf16(C.data(), g.ldc, g.A.data() + k0, g.lda, g.Wp.data() + k0 * 16, g.Kp * 16, g.M, g.N,
                                 std::min<int64_t>(512, g.Kp - k0), k0 > 0);
            };
            call();
            int64_t reps = 0;
            double total = 0.0;
            const auto t0 = std::chrono::steady_clock::now();
            while (total < 0.25) {
                call();
                ++reps;
                total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            }
            std::printf("bench   %-7s gemm_bf16 M=%-3" PRId64 " N=%-3" PRId64 " Kp=%-5" PRId64 " K-sliced %8.1f GFLOP/s\n",
                        k->name, g.M, g.N, g.Kp, 2.0 * g.M * g.N * g.Kp / (total / reps) * 1e-9);
        }
    }
}

}  // namespace

int main(int argc, char **argv) {
    const std::vector<const Kernels *> isas = available_isas();
    const char *names[] = {"gemm_bf16", "sgemm_nt", "sgemm_nn", "sgemm_tn", "bf16_to_f32", "f32_to_bf16"};
    std::vector<std::vector<Stats>> stats(6, std::vector<Stats>(isas.size()));
    test_gemm(isas, stats[0]);
    test_sgemm(kNT, isas, stats[1]);
    test_sgemm(kNN, isas, stats[2]);
    test_sgemm(kTN, isas, stats[3]);
    test_bf16_to_f32(isas, stats[4]);
    test_f32_to_bf16(isas, stats[5]);
    std::printf("(scalar gemms are checked against a double-precision reference; the others against scalar)\n");
    for (size_t i = 0; i < isas.size(); ++i)
        for (int k = 0; k < 6; ++k) print(isas[i]->name, names[k], stats[k][i], k >= 4);
    if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) bench(isas);
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
