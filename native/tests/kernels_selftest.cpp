// Kernel self-test: every ISA table whose CPU features are present, against the scalar oracle.
//
//   gemm_bf16, sgemm_*: ragged shapes, strides larger than needed, accumulate on/off; tolerance
//     for FP32 accumulation-order differences: |d| <= 1e-5 * (sum |terms| + |C0|) + 1e-6.
//     The scalar oracle itself is checked against a double-precision reference with the same bound.
//     Padding of A (columns Kp..lda) holds NaN and padding of C (columns N..ldc) a sentinel:
//     reading the first or writing the second fails the case.
//   bf16_to_f32, f32_to_bf16: bit-exact (all 65536 BF16 patterns; random and special FP32 bits).
//   glu, glu_backward (both activation kinds, g and u across the clamps): the scalar oracle
//     against a double-precision reference within one BF16 rounding (2^-8 relative) plus 2e-6
//     relative for the FP32 evaluation (its exp polynomial is within 2e-7); every other path
//     against the oracle within one BF16 ulp of the oracle's value (the same FP32 formula, up to
//     FMA contraction, rounds to the same or an adjacent BF16 value). dg and du may also be off by
//     1e-6 (oracle) / 1e-5 (others) of the magnitude of their terms, which cancel near
//     g = -1.28. h_f32 is float(h) bit for bit; dw, an FP32 sum, has the gemms' bound.
//   transpose_block: bit-exact; the oracle against the offsets of kernels.h.
//   gemm_bf16_wt (the paths that have it): against a double-precision reference, the gemms' bound.
//   gemm_q8 (the paths that have it): bit-exact against the path's gemm_bf16 on the decoded panels.
//   decode_rows (FP8 E4M3 and INT8): bit-exact, every path against an independent reference:
//     the code's value from its bit fields, times the scale in double (exact: <= 4 + 24
//     significant bits), rounded to FP32 and then to BF16 -- what one FP32 product is. Every
//     non-NaN code, scales 0, +-2^-100, +-2^100 and random ones.
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
#include "dispatch.h"
#include "kernels.h"
#include "kt_trl.h"

namespace {

using kt::Kernels;

constexpr float kSentinel = 1234.5f;
constexpr uint16_t kGuardBf16 = 0xabcd;
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

// ---------------------------------------------------------------- gemm_bf16_wt

// The paths that have it against a double-precision reference: C[m, c] = sum_n A[m, n] W[n, k0 + c]
// over Rn weight rows, W read from its packed panels starting at packed row k0 / 2.
void test_gemm_wt(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    for (int64_t M : {1, 7, 8, 9, 16, 31, 33, 64})
        for (int64_t Rn : {16, 48, 96})
            for (int64_t Kp : {32, 96, 256})
                for (int64_t k0 : {0, 64})
                    for (int64_t cn : {16, 32, 48, 208}) {
                        if (k0 + (cn + 31) / 32 * 32 > Kp) continue;
                        const int64_t lda = Rn + 3, ldc = cn + 5;
                        std::vector<uint16_t> A((M - 1) * lda + Rn), Wp(Rn * Kp);
                        for (auto &v : A) v = random_bf16();
                        for (auto &v : Wp) v = random_bf16();
                        std::vector<float> want((M - 1) * ldc + cn, kSentinel);
                        std::vector<double> scale(M * cn);
                        for (int64_t m = 0; m < M; ++m)
                            for (int64_t c = 0; c < cn; ++c) {
                                double acc = 0.0, mag = 0.0;
                                for (int64_t n = 0; n < Rn; ++n) {
                                    const double t = double(kt::bf16_to_float(A[m * lda + n])) *
                                                     kt::bf16_to_float(packed_at(Wp, Kp, n, k0 + c));
                                    acc += t;
                                    mag += std::fabs(t);
                                }
                                want[m * ldc + c] = float(acc);
                                scale[m * cn + c] = mag;
                            }
                        // Runs handed out from a copy (as an 8-bit weight's decoded runs are), checked
                        // to come in increasing order.
                        struct Source {
                            const std::vector<uint16_t> &Wp;
                            int64_t Kp, k0, cn, next = 0;
                            bool ordered = true;
                            std::vector<uint16_t> run;
                            static const uint16_t *rows(const void *ctx, int64_t p0, int64_t p1, int64_t *ldw) {
                                auto &s = *const_cast<Source *>(static_cast<const Source *>(ctx));
                                s.ordered = s.ordered && p0 == s.next && p1 - p0 <= kt::kWtPanelRun;
                                s.next = p1;
                                const int64_t kn = (s.cn + 31) / 32 * 32;
                                s.run.assign((p1 - p0) * kn * 16, kBf16NaN);
                                for (int64_t p = p0; p < p1; ++p)
                                    std::memcpy(s.run.data() + (p - p0) * kn * 16, s.Wp.data() + p * s.Kp * 16 + (s.k0 / 2) * 32,
                                                sizeof(uint16_t) * kn * 16);
                                *ldw = kn * 16;
                                return s.run.data();
                            }
                            kt::WtPanels panels() const { return {rows, this}; }
                        };
                        const std::string name = "M=" + std::to_string(M) + " Rn=" + std::to_string(Rn) + " Kp=" +
                                                 std::to_string(Kp) + " k0=" + std::to_string(k0) + " cn=" + std::to_string(cn);
                        for (size_t i = 0; i < isas.size(); ++i) {
                            if (!isas[i]->gemm_bf16_wt) continue;
                            std::vector<float> C(want.size(), kSentinel);
                            std::vector<uint16_t> scratch(kt::wt_scratch_elems(M, Rn, cn));
                            Source source{Wp, Kp, k0, cn};
                            isas[i]->gemm_bf16_wt(C.data(), ldc, A.data(), lda, source.panels(), M, Rn, cn,
                                                  scratch.data());
                            record(stats[i], compare(C, want, scale, M, cn, ldc, stats[i]) && source.ordered &&
                                                 source.next == Rn / 16, name);
                        }
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

// ---------------------------------------------------------------- activations

// The exact activation of kernels.h at one (g, u) and the magnitude of the terms of each
// derivative (the scale of the FP32 cancellation error).
struct ActRef {
    double h, dh_dg, dh_du, mag_dg, mag_du;
};

ActRef act_ref(double g, double u, const kt::Activation &a) {
    if (a.kind == KT_ACT_SILU) {
        const double sig = 1.0 / (1.0 + std::exp(-g));
        return {g * sig * u, u * sig * (1.0 + g * (1.0 - sig)), g * sig,
                std::fabs(u) * sig * (1.0 + std::fabs(g) * (1.0 - sig)), std::fabs(g) * sig};
    }
    const bool g_in = g <= a.limit, u_in = u >= -a.limit && u <= a.limit;
    const double gc = g_in ? g : a.limit, uc = u_in ? u : (u > 0 ? a.limit : -a.limit);
    const double sig = 1.0 / (1.0 + std::exp(-a.alpha * gc)), glu = gc * sig;
    const double mag_dg = (std::fabs(uc) + 1.0) * sig * (1.0 + a.alpha * std::fabs(gc) * (1.0 - sig));
    return {(uc + 1.0) * glu, g_in ? (uc + 1.0) * sig * (1.0 + a.alpha * gc * (1.0 - sig)) : 0.0, u_in ? glu : 0.0,
            g_in ? mag_dg : 0.0, u_in ? std::fabs(glu) : 0.0};
}

// Distance from |v| to the next BF16 value up (0 for 0).
double bf16_ulp(double v) { return v == 0.0 ? 0.0 : std::ldexp(1.0, std::ilogb(v) - 7); }

struct ActCase {
    kt::Activation act;
    int64_t n;
    float w;
    std::vector<uint16_t> g, u;
    std::vector<float> G;
    std::string name;
};

struct ActOut {
    std::vector<uint16_t> h, dg, du;   // each with one guard element past the end
    std::vector<float> h_f32, h_f32_bwd;   // of glu and of glu_backward
    float dw = 0.0f;
};

ActOut run_act(const Kernels &k, const ActCase &c) {
    ActOut o;
    o.h.assign(c.n + 1, kGuardBf16);
    o.h_f32.assign(c.n + 1, kSentinel);
    k.glu(o.h.data(), o.h_f32.data(), c.g.data(), c.u.data(), c.n, c.act);
    o.dg.assign(c.n + 1, kGuardBf16);
    o.du.assign(c.n + 1, kGuardBf16);
    o.h_f32_bwd.assign(c.n + 1, kSentinel);
    o.dw = k.glu_backward(o.dg.data(), o.du.data(), o.h_f32_bwd.data(), c.G.data(), c.w, c.g.data(), c.u.data(),
                          c.n, c.act);
    return o;
}

// BF16 got[i] vs want[i] for i < n within tol(i); got[n], one past the end, must still hold the guard.
template <typename Tol>
bool within(const std::vector<uint16_t> &got, const std::vector<double> &want, int64_t n, const Tol &tol, Stats &s) {
    bool ok = got[n] == kGuardBf16;
    for (int64_t i = 0; i < n; ++i) {
        const double d = std::fabs(double(kt::bf16_to_float(got[i])) - want[i]), t = tol(i);
        if (!(d <= t)) ok = false;   // NaN fails too
        s.max_abs = std::max(s.max_abs, std::isnan(d) ? INFINITY : d);
        if (t > 0) s.max_ratio = std::max(s.max_ratio, std::isnan(d) ? INFINITY : d / t);
    }
    return ok;
}

std::vector<double> as_double(const std::vector<uint16_t> &v) {
    std::vector<double> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = kt::bf16_to_float(v[i]);
    return out;
}

// h_f32 == float(h) bit for bit over n values, and its guard untouched.
bool h_f32_exact(const std::vector<uint16_t> &h, const std::vector<float> &h_f32, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float f = kt::bf16_to_float(h[i]);
        if (std::memcmp(&h_f32[i], &f, sizeof f) != 0) return false;
    }
    return h_f32[n] == kSentinel;
}

// One case: the oracle against the double reference, then every other path against the oracle.
void check_act_case(const std::vector<const Kernels *> &isas, const ActCase &c, std::vector<Stats> &fwd,
                    std::vector<Stats> &bwd) {
    const int64_t n = c.n;
    const ActOut oracle = run_act(*isas[0], c);
    std::vector<ActRef> ref;
    std::vector<double> h_ref, dg_ref, du_ref, wG;
    double dw_ref = 0.0, dw_scale = 0.0;   // <G, h> with the oracle's h, and sum |G h|
    for (int64_t i = 0; i < n; ++i) {
        ref.push_back(act_ref(kt::bf16_to_float(c.g[i]), kt::bf16_to_float(c.u[i]), c.act));
        wG.push_back(double(c.w) * c.G[i]);
        h_ref.push_back(ref[i].h);
        dg_ref.push_back(wG[i] * ref[i].dh_dg);
        du_ref.push_back(wG[i] * ref[i].dh_du);
        const double h = kt::bf16_to_float(oracle.h[i]);
        dw_ref += c.G[i] * h;
        dw_scale += std::fabs(c.G[i] * h);
    }
    const double rel = std::ldexp(1.0, -8) + 2e-6;   // one BF16 rounding + the FP32 evaluation
    auto dg_term = [&](int64_t i) { return std::fabs(wG[i]) * ref[i].mag_dg; };
    auto du_term = [&](int64_t i) { return std::fabs(wG[i]) * ref[i].mag_du; };
    bool ok = within(oracle.h, h_ref, n, [&](int64_t i) { return rel * std::fabs(h_ref[i]); }, fwd[0]);
    record(fwd[0], ok && h_f32_exact(oracle.h, oracle.h_f32, n), c.name);
    ok = std::fabs(oracle.dw - dw_ref) <= 1e-5 * dw_scale + 1e-6 && h_f32_exact(oracle.h, oracle.h_f32_bwd, n);
    ok &= within(oracle.dg, dg_ref, n,
                 [&](int64_t i) { return rel * std::fabs(dg_ref[i]) + 1e-6 * dg_term(i); }, bwd[0]);
    ok &= within(oracle.du, du_ref, n,
                 [&](int64_t i) { return rel * std::fabs(du_ref[i]) + 1e-6 * du_term(i); }, bwd[0]);
    record(bwd[0], ok, c.name);

    const std::vector<double> h_o = as_double(oracle.h), dg_o = as_double(oracle.dg), du_o = as_double(oracle.du);
    for (size_t k = 1; k < isas.size(); ++k) {
        const ActOut got = run_act(*isas[k], c);
        ok = within(got.h, h_o, n, [&](int64_t i) { return bf16_ulp(h_o[i]); }, fwd[k]);
        record(fwd[k], ok && h_f32_exact(got.h, got.h_f32, n), c.name);
        ok = std::fabs(double(got.dw) - oracle.dw) <= 1e-5 * dw_scale + 1e-6 && h_f32_exact(got.h, got.h_f32_bwd, n);
        ok &= within(got.dg, dg_o, n, [&](int64_t i) { return bf16_ulp(dg_o[i]) + 1e-5 * dg_term(i); },
                     bwd[k]);
        ok &= within(got.du, du_o, n, [&](int64_t i) { return bf16_ulp(du_o[i]) + 1e-5 * du_term(i); },
                     bwd[k]);
        record(bwd[k], ok, c.name);
    }
}

void test_act(const std::vector<const Kernels *> &isas, std::vector<Stats> &fwd, std::vector<Stats> &bwd) {
    for (int32_t kind : {KT_ACT_SILU, KT_ACT_CLAMPED_SWIGLU})
        for (int64_t n : kLens) {
            ActCase c{kt::Activation{kind, 1.702f, 7.0f}, n, uniform(0.0f, 1.0f), {}, {}, {}, ""};
            for (int64_t i = 0; i < n; ++i) {   // across the clamps at +-7
                c.g.push_back(kt::float_to_bf16(uniform(-10.0f, 10.0f)));
                c.u.push_back(kt::float_to_bf16(uniform(-10.0f, 10.0f)));
                c.G.push_back(uniform(-1.0f, 1.0f));
            }
            c.name = "kind=" + std::to_string(kind) + " n=" + std::to_string(n);
            check_act_case(isas, c, fwd, bwd);
        }
}

// ---------------------------------------------------------------- transpose

void test_transpose(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    std::uniform_int_distribution<int> bits(0, 0xffff);
    for (int rep = 0; rep < 64; ++rep)
        for (int off : {0, 3}) {   // unaligned source and destination too
            std::vector<uint16_t> src(256 + off), want(256);
            for (auto &v : src) v = static_cast<uint16_t>(bits(rng));
            for (int n = 0; n < 16; ++n)   // kernels.h: dst(n, k) = src(n, k) at the two layouts' offsets
                for (int k = 0; k < 16; ++k)
                    want[(n / 2) * 32 + k * 2 + n % 2] = src[off + (k / 2) * 32 + n * 2 + k % 2];
            for (size_t i = 0; i < isas.size(); ++i) {
                std::vector<uint16_t> dst(256 + off + 1, kGuardBf16);
                isas[i]->transpose_block(dst.data() + off, src.data() + off);
                int64_t bad = std::memcmp(dst.data() + off, want.data(), 512) != 0;
                bad += dst[256 + off] != kGuardBf16;
                for (int j = 0; j < off; ++j) bad += dst[j] != kGuardBf16;
                stats[i].max_ratio = std::max(stats[i].max_ratio, double(bad));
                record(stats[i], bad == 0, "transpose rep=" + std::to_string(rep) + " off=" + std::to_string(off));
            }
        }
}

// ---------------------------------------------------------------- decode_rows

double code_value(uint8_t c, int32_t format) {
    if (format == KT_FORMAT_INT8) return static_cast<int8_t>(c);
    const int e = (c >> 3) & 15, m = c & 7;
    const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
    return c & 0x80 ? -mag : mag;
}

void test_decode(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (int32_t format : {KT_FORMAT_FP8_E4M3, KT_FORMAT_INT8})
        for (int rep = 0; rep < 64; ++rep) {
            const int64_t rows = 1 + rep % 9;
            std::vector<uint8_t> src(rows * 32);
            for (int64_t i = 0; i < rows * 32; ++i) {   // the first reps walk every code
                int c = rep < 8 ? static_cast<int>((rep * rows * 32 + i) % 256) : byte(rng);
                if (format == KT_FORMAT_FP8_E4M3 && (c & 0x7f) == 0x7f) c ^= 1;   // NaN codes are refused at load
                src[i] = static_cast<uint8_t>(c);
            }
            float scales[16];
            const float specials[] = {0.0f, 0x1p-100f, -0x1p-100f, 0x1p100f, -0x1p100f};
            for (int c = 0; c < 16; ++c)
                scales[c] = rep % 4 == 0 && c < 5 ? specials[c] : uniform(-1.0f, 1.0f) * std::ldexp(1.0f, byte(rng) % 40 - 20);
            std::vector<uint16_t> want(rows * 32);
            for (int64_t i = 0; i < rows * 32; ++i)
                want[i] = kt::float_to_bf16(static_cast<float>(code_value(src[i], format) * scales[(i % 32) / 2]));
            for (size_t k = 0; k < isas.size(); ++k) {
                std::vector<uint16_t> dst(rows * 32 + 1, kGuardBf16);
                isas[k]->decode_rows(dst.data(), src.data(), rows, scales, format);
                int64_t bad = dst[rows * 32] != kGuardBf16;
                for (int64_t i = 0; i < rows * 32; ++i) bad += dst[i] != want[i];
                stats[k].max_ratio = std::max(stats[k].max_ratio, double(bad));
                record(stats[k], bad == 0, std::string("decode ") + (format == KT_FORMAT_INT8 ? "int8" : "fp8") +
                                               " rep=" + std::to_string(rep));
            }
        }
}

// ---------------------------------------------------------------- gemm_q8

// The paths that have it, bit for bit against their own gemm_bf16 on the panels decode_rows gives
// (one scale block per rows_per_block packed rows, the last one all rows past it), with A's
// padding NaN and C's a sentinel as in the gemms; rows past 32 reread the decoded pair.
void test_gemm_q8(const std::vector<const Kernels *> &isas, std::vector<Stats> &stats) {
    std::uniform_int_distribution<int> byte(0, 255);
    for (int32_t format : {KT_FORMAT_FP8_E4M3, KT_FORMAT_INT8})
        for (int64_t M : {1, 9, 16, 17, 31, 32, 33, 70})
            for (int64_t N : {16, 48, 64})
                for (int64_t Kp : {32, 96, 544})
                    for (int64_t rpb : {int64_t(8), int64_t(64), Kp / 2}) {
                        const int64_t nkb = (Kp / 2 + rpb - 1) / rpb, lda = Kp + 8, ldc = N + 5;
                        std::vector<uint8_t> codes(N * Kp);
                        for (auto &c : codes) {
                            c = static_cast<uint8_t>(byte(rng));
                            if (format == KT_FORMAT_FP8_E4M3 && (c & 0x7f) == 0x7f) c ^= 1;
                        }
                        std::vector<float> scales(N / 16 * nkb * 16);
                        for (auto &v : scales) v = uniform(-1.0f, 1.0f) * (format == KT_FORMAT_INT8 ? 1.0f / 127 : 1.0f / 256);
                        const kt::Q8Panels W{codes.data(), scales.data(), Kp, nkb, rpb, format};
                        std::vector<uint16_t> A((M - 1) * lda + Kp, kBf16NaN);
                        for (int64_t m = 0; m < M; ++m)
                            for (int64_t k = 0; k < Kp; ++k) A[m * lda + k] = random_bf16();
                        const std::string name = std::string(format == KT_FORMAT_INT8 ? "int8" : "fp8") + " M=" +
                                                 std::to_string(M) + " N=" + std::to_string(N) + " Kp=" + std::to_string(Kp) +
                                                 " rows/block=" + std::to_string(rpb);
                        for (size_t i = 0; i < isas.size(); ++i) {
                            if (!isas[i]->gemm_q8) continue;
                            const Kernels &k = *isas[i];
                            std::vector<uint16_t> panels(N * Kp);
                            for (int64_t p = 0; p < N / 16; ++p)
                                kt::decode_panel_rows(panels.data() + p * Kp * 16, W, p, 0, Kp / 2, k.decode_rows);
                            std::vector<float> want((M - 1) * ldc + N, kSentinel), got = want;
                            k.gemm_bf16(want.data(), ldc, A.data(), lda, panels.data(), Kp * 16, M, N, Kp, false);
                            std::vector<uint16_t> scratch(2 * Kp * 16);
                            k.gemm_q8(got.data(), ldc, A.data(), lda, W, M, N, scratch.data());
                            int64_t bad = 0;
                            for (size_t j = 0; j < got.size(); ++j) bad += std::memcmp(&got[j], &want[j], sizeof(float)) != 0;
                            stats[i].max_ratio = std::max(stats[i].max_ratio, double(bad));
                            record(stats[i], bad == 0, name);
                        }
                    }
}

// ---------------------------------------------------------------- driver

// Every path dispatch would select on this CPU (kt::isa_available), scalar first.
std::vector<const Kernels *> available_isas() {
    std::printf("cpu features 0x%x\n", kt::cpu_features());
    std::vector<const Kernels *> isas;
    for (int32_t isa : {KT_ISA_SCALAR, KT_ISA_AVX2, KT_ISA_AVX512, KT_ISA_AMX}) {
        if (kt::isa_available(isa)) isas.push_back(&kt::kernels_for(isa));
        else std::printf("%-7s skipped: this CPU lacks a feature it needs\n", kt::kernels_for(isa).name);
    }
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
    // decode_rows as bf16_panels calls it: runs of 64 rows (a 128-value scale block), L2-resident codes.
    std::vector<uint8_t> codes(64 * 1024 * 32, 0x38);
    std::vector<uint16_t> out(codes.size());
    const float scales[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
    for (const Kernels *k : isas)
        for (int32_t format : {KT_FORMAT_FP8_E4M3, KT_FORMAT_INT8}) {
            int64_t reps = 0;
            double total = 0.0;
            const auto t0 = std::chrono::steady_clock::now();
            while (total < 0.25) {
                for (size_t r = 0; r < codes.size() / 32; r += 64) k->decode_rows(out.data() + r * 32, codes.data() + r * 32, 64, scales, format);
                ++reps;
                total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            }
            std::printf("bench   %-7s decode_rows %s %8.2f Gvalues/s\n", k->name, format == KT_FORMAT_INT8 ? "int8" : "fp8 ",
                        double(codes.size()) * reps / total * 1e-9);
        }
}

}  // namespace

int main(int argc, char **argv) {
    const std::vector<const Kernels *> isas = available_isas();
    const char *names[] = {"gemm_bf16", "sgemm_nt", "sgemm_nn", "sgemm_tn", "bf16_to_f32", "f32_to_bf16",
                           "transpose", "decode_rows", "glu", "glu_backward", "gemm_bf16_wt", "gemm_q8"};
    const int kinds = sizeof names / sizeof names[0], first_bit_exact = 4, last_bit_exact = 7;
    std::vector<std::vector<Stats>> stats(kinds, std::vector<Stats>(isas.size()));
    test_gemm(isas, stats[0]);
    test_sgemm(kNT, isas, stats[1]);
    test_sgemm(kNN, isas, stats[2]);
    test_sgemm(kTN, isas, stats[3]);
    test_bf16_to_f32(isas, stats[4]);
    test_f32_to_bf16(isas, stats[5]);
    test_transpose(isas, stats[6]);
    test_decode(isas, stats[7]);
    test_act(isas, stats[8], stats[9]);
    test_gemm_wt(isas, stats[10]);
    test_gemm_q8(isas, stats[11]);
    std::printf("(scalar gemms and activations are checked against a double-precision reference; the others "
                "against scalar)\n");
    for (size_t i = 0; i < isas.size(); ++i)
        for (int k = 0; k < kinds; ++k)
            print(isas[i]->name, names[k], stats[k][i], (k >= first_bit_exact && k <= last_bit_exact) || k == kinds - 1);
    if (argc > 1 && std::strcmp(argv[1], "--bench") == 0) bench(isas);
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}
