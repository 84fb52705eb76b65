// The extern "C" boundary: every argument is checked here, every exception becomes a kt_status
// plus a thread-local message (guarded, error.h), or a fallback value where there is no status to
// return (guarded_or). Only entry points that cannot throw (constants, the message, delete) call
// straight through. Nothing below this file sees an unchecked pointer or size.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <utility>

#include "cpu_features.h"
#include "dispatch.h"
#include "driver.h"
#include "error.h"
#include "kt_trl.h"

namespace kt {
namespace {

// a * b * c without overflow, or an error naming what.
int64_t checked_product(int64_t a, int64_t b, int64_t c, const char *what) {
    const int64_t lim = std::numeric_limits<int64_t>::max() / 8;
    KT_CHECK(a >= 0 && b >= 0 && c >= 0, "%s: negative size", what);
    KT_CHECK(a == 0 || b <= lim / a, "%s: size overflows", what);
    KT_CHECK(a * b == 0 || c <= lim / (a * b), "%s: size overflows", what);
    return a * b * c;
}

// A pointer the kernels dereference as T[] must be aligned for T (misaligned is undefined behaviour).
template <typename T>
bool aligned(const T *p) { return reinterpret_cast<uintptr_t>(p) % alignof(T) == 0; }

template <typename T>
void check_aligned(const T *p, const char *name) {
    KT_CHECK(aligned(p), "%s pointer %p is not aligned to its %zu-byte elements", name, static_cast<const void *>(p),
             alignof(T));
}

// Whether two indices of [E, out, r] with these strides may reach one element: taken by increasing
// stride, each dim of size > 1 must step past the span of the smaller ones (strides >= 0, no overflow:
// lora_view checked both).
bool strides_overlap(const LoraView &v, int64_t E, int64_t out) {
    std::array<std::pair<int64_t, int64_t>, 3> dims{{{v.se, E}, {v.so, out}, {v.sq, v.r}}};   // (stride, size)
    std::sort(dims.begin(), dims.end());
    int64_t span = 1;
    for (const auto &[stride, size] : dims) {
        if (size <= 1) continue;
        if (stride < span) return true;
        span += stride * (size - 1);
    }
    return false;
}

void check_experts(const kt_experts *ex) {
    KT_CHECK(ex != nullptr, "experts handle is NULL");
    for (int64_t e = 0; e < ex->E; ++e)
        KT_CHECK(ex->loaded[e], "expert %lld has no weights yet; call kt_experts_load for every expert", (long long)e);
}

void check_expert_index(const kt_experts *ex, int64_t e) {
    KT_CHECK(ex != nullptr, "experts handle is NULL");
    KT_CHECK(e >= 0 && e < ex->E, "expert index %lld is out of range [0, %lld)", (long long)e, (long long)ex->E);
}

// What forward and backward both check first: the engine, the routing and the two LoRAs.
struct CallInputs {
    RoutePlan plan;
    LoraView lora_gu, lora_dn;
};

void check_call(CallInputs &in, const kt_experts *ex, const kt_routing *routing, const kt_lora *lora_gate_up,
                const kt_lora *lora_down) {
    check_experts(ex);
    {
        StageTimer timer(KT_STAGE_PLAN);
        plan_routes(in.plan, routing, ex->E);
    }
    checked_product(in.plan.T * in.plan.k, ex->H + 2 * ex->I, 8, "tokens x top_k");
    in.lora_gu = lora_view(lora_gate_up, ex->E, 2 * ex->I, ex->H, "gate_up");
    in.lora_dn = lora_view(lora_down, ex->E, ex->H, ex->I, "down");
}

void check_saved_aligned(const kt_saved_activations &s) {
    check_aligned(s.gate_up, "saved gate_up");
    check_aligned(s.lora_gate_up, "saved lora_gate_up");
    check_aligned(s.lora_down, "saved lora_down");
}

// Whether a projection's gradients ask for anything.
bool wanted(const kt_lora_grad &g) { return g.dA || g.dB; }

}  // namespace

LoraView lora_view(const kt_lora *l, int64_t E, int64_t out, int64_t in, const char *name) {
    LoraView v;
    if (!l) return v;
    KT_CHECK(l->rank >= 0 && l->rank <= 4096, "%s LoRA rank must be in [0, 4096], got %lld", name, (long long)l->rank);
    if (l->rank == 0) return v;
    KT_CHECK(l->A && l->B, "%s LoRA A or B pointer is NULL", name);
    KT_CHECK(aligned(l->A) && aligned(l->B), "%s LoRA A or B pointer is not aligned to its 4-byte elements", name);
    KT_CHECK(l->B_stride_e >= 0 && l->B_stride_out >= 0 && l->B_stride_rank >= 0, "%s LoRA B strides must be >= 0", name);
    checked_product(E, l->rank, in, name);
    // The last element's offset, summed without overflow (each term and the sum stay below lim).
    const int64_t lim = std::numeric_limits<int64_t>::max() / 8;
    int64_t last = 0;
    for (const int64_t term : {checked_product(E - 1, l->B_stride_e, 1, name), checked_product(out - 1, l->B_stride_out, 1, name),
                               checked_product(l->rank - 1, l->B_stride_rank, 1, name)}) {
        KT_CHECK(last <= lim - term, "%s LoRA B strides overflow", name);
        last += term;
    }
    v.A = l->A;
    v.B = l->B;
    v.r = l->rank;
    v.se = l->B_stride_e;
    v.so = l->B_stride_out;
    v.sq = l->B_stride_rank;
    v.scale = l->scale;
    return v;
}

}  // namespace kt

using namespace kt;

KT_API int32_t kt_abi_version(void) { return KT_ABI_VERSION; }
KT_API const char *kt_last_error(void) { return last_error(); }
KT_API uint32_t kt_cpu_features(void) { return guarded_or<uint32_t>(0, [] { return cpu_features(); }); }
KT_API void kt_cpu_hide_features(uint32_t features) { hide_cpu_features(features); }

KT_API int32_t kt_isa_available(int32_t isa) {
    return guarded_or<int32_t>(0, [&] { return isa_available(isa) ? 1 : 0; });
}

KT_API int32_t kt_physical_cores(void) { return guarded_or<int32_t>(1, [] { return physical_cores(); }); }

KT_API kt_status kt_runtime_configure(int32_t isa, int32_t threads) {
    return guarded([&] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        configure(isa, threads);
    });
}

KT_API int32_t kt_runtime_isa(void) {
    return guarded_or<int32_t>(KT_ISA_AUTO, [] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        return runtime().isa;
    });
}

KT_API int32_t kt_runtime_threads(void) {
    return guarded_or<int32_t>(0, [] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        return runtime().threads;
    });
}

KT_API void kt_profile_read(double *ms, int32_t reset) {
    guarded_or([&] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        profile_read(ms, reset != 0);
    });
}

namespace {

// A new engine's sizes and layouts for (E, H, I, format, block_k), all checked; no weight memory yet.
std::unique_ptr<kt_experts> new_experts(int64_t E, int64_t H, int64_t I, int32_t format, int64_t block_k) {
    KT_CHECK(E >= 1 && E <= 65536, "num_experts must be in [1, 65536], got %lld", (long long)E);
    KT_CHECK(H >= 1 && H <= (1 << 20), "hidden size must be in [1, 2^20], got %lld", (long long)H);
    KT_CHECK(I >= 1 && I <= (1 << 20), "intermediate size must be in [1, 2^20], got %lld", (long long)I);
    KT_CHECK(format == KT_FORMAT_BF16 || format == KT_FORMAT_FP8_E4M3 || format == KT_FORMAT_INT8,
             "unknown weight format %d (KT_FORMAT_BF16, KT_FORMAT_FP8_E4M3 or KT_FORMAT_INT8)", format);
    KT_CHECK(format != KT_FORMAT_BF16 || block_k == 0, "block_k must be 0 for BF16 weights, got %lld",
             (long long)block_k);
    KT_CHECK(block_k == 0 || (block_k > 0 && block_k % 16 == 0 && block_k <= (1 << 20)),
             "block_k must be 0 (one scale per row) or a positive multiple of 16, got %lld", (long long)block_k);
    auto ex = std::make_unique<kt_experts>();
    ex->E = E; ex->H = H; ex->I = I;
    ex->Hp = round_up(H, kKAlign);
    ex->Ip = round_up(I, kKAlign);
    ex->GUp = round_up(2 * I, kKAlign);
    ex->ldx = ex->Hp + kKAlign;
    ex->ldh = ex->Ip + kKAlign;
    ex->ldgu = ex->GUp + kKAlign;
    ex->gu_layout = WeightLayout(format, 2 * I, H, block_k);
    ex->d_layout = WeightLayout(format, H, I, block_k);
    ex->expert_bytes = ex->gu_layout.bytes() + ex->d_layout.bytes();
    ex->loaded.assign(E, 0);
    return ex;
}

int64_t weight_bytes(const kt_experts &ex) { return checked_product(ex.E, ex.expert_bytes, 1, "packed experts"); }

}  // namespace

KT_API kt_status kt_experts_create(kt_experts **out, int64_t E, int64_t H, int64_t I, int32_t format, int64_t block_k) {
    return guarded([&] {
        KT_CHECK(out != nullptr, "output handle pointer is NULL");
        *out = nullptr;
        std::unique_ptr<kt_experts> ex = new_experts(E, H, I, format, block_k);
        ex->base_ = ex->packed.get<uint8_t>(weight_bytes(*ex));
        *out = ex.release();
    });
}

KT_API kt_status kt_experts_weight_bytes(int64_t *out, int64_t E, int64_t H, int64_t I, int32_t format,
                                         int64_t block_k) {
    return guarded([&] {
        KT_CHECK(out != nullptr, "output pointer is NULL");
        *out = weight_bytes(*new_experts(E, H, I, format, block_k));
    });
}

KT_API kt_status kt_experts_create_in(kt_experts **out, int64_t E, int64_t H, int64_t I, int32_t format,
                                      int64_t block_k, void *memory, int64_t memory_bytes, int32_t filled) {
    return guarded([&] {
        KT_CHECK(out != nullptr, "output handle pointer is NULL");
        *out = nullptr;
        KT_CHECK(memory != nullptr, "memory pointer is NULL");
        KT_CHECK(reinterpret_cast<uintptr_t>(memory) % 64 == 0, "memory %p is not 64-byte aligned", memory);
        std::unique_ptr<kt_experts> ex = new_experts(E, H, I, format, block_k);
        const int64_t need = weight_bytes(*ex);
        KT_CHECK(memory_bytes >= need, "memory holds %lld bytes; these experts need %lld (kt_experts_weight_bytes)",
                 (long long)memory_bytes, (long long)need);
        ex->base_ = static_cast<uint8_t *>(memory);
        if (filled) ex->loaded.assign(E, 1);
        *out = ex.release();
    });
}

KT_API void kt_experts_destroy(kt_experts *ex) { delete ex; }

namespace {

// The checks of both loads: expert index, pointers, row strides.
void check_load(const kt_experts *ex, int64_t e, const void *gate_up, int64_t gate_up_ld, const void *down,
                int64_t down_ld) {
    check_expert_index(ex, e);
    KT_CHECK(gate_up && down, "gate_up or down pointer is NULL");
    KT_CHECK(gate_up_ld <= (int64_t(1) << 40) && down_ld <= (int64_t(1) << 40), "row strides must be <= 2^40");
    KT_CHECK(gate_up_ld >= ex->H, "gate_up row stride %lld is smaller than hidden size %lld", (long long)gate_up_ld, (long long)ex->H);
    KT_CHECK(down_ld >= ex->I, "down row stride %lld is smaller than intermediate size %lld", (long long)down_ld, (long long)ex->I);
}

const char *format_name(int32_t format) {
    return format == KT_FORMAT_FP8_E4M3 ? "FP8 E4M3" : format == KT_FORMAT_INT8 ? "INT8" : "BF16";
}

}  // namespace

KT_API kt_status kt_experts_load(kt_experts *ex, int64_t e, const uint16_t *gate_up, int64_t gate_up_ld,
                                 const uint16_t *down, int64_t down_ld) {
    return guarded([&] {
        check_load(ex, e, gate_up, gate_up_ld, down, down_ld);
        KT_CHECK(ex->format() == KT_FORMAT_BF16, "this engine stores %s weights: load codes and scales with "
                 "kt_experts_load_8bit", format_name(ex->format()));
        check_aligned(gate_up, "gate_up");
        check_aligned(down, "down");
        pack_bf16(ex->gate_up(e), gate_up, gate_up_ld);
        pack_bf16(ex->down(e), down, down_ld);
        ex->loaded[e] = 1;
    });
}

KT_API kt_status kt_experts_load_8bit(kt_experts *ex, int64_t e, const uint8_t *gate_up, int64_t gate_up_ld,
                                      const float *gate_up_scales, const uint8_t *down, int64_t down_ld,
                                      const float *down_scales) {
    return guarded([&] {
        check_load(ex, e, gate_up, gate_up_ld, down, down_ld);
        KT_CHECK(ex->format() != KT_FORMAT_BF16, "this engine stores BF16 weights: load them with kt_experts_load");
        KT_CHECK(gate_up_scales && down_scales, "gate_up_scales or down_scales pointer is NULL");
        check_aligned(gate_up_scales, "gate_up_scales");
        check_aligned(down_scales, "down_scales");
        char what[64];
        std::snprintf(what, sizeof what, "expert %lld gate_up", (long long)e);
        pack_8bit(ex->gate_up(e), gate_up, gate_up_ld, gate_up_scales, what);
        std::snprintf(what, sizeof what, "expert %lld down", (long long)e);
        pack_8bit(ex->down(e), down, down_ld, down_scales, what);
        ex->loaded[e] = 1;
    });
}

KT_API kt_status kt_experts_set_activation(kt_experts *ex, int32_t kind, float alpha, float limit) {
    return guarded([&] {
        KT_CHECK(ex != nullptr, "experts handle is NULL");
        KT_CHECK(kind == KT_ACT_SILU || kind == KT_ACT_CLAMPED_SWIGLU, "unknown activation kind %d", kind);
        KT_CHECK(std::isfinite(alpha) && std::isfinite(limit) && limit > 0.0f,
                 "activation alpha and limit must be finite and limit > 0 (got %g, %g)", alpha, limit);
        ex->act = Activation{kind, alpha, limit};
    });
}

KT_API kt_status kt_experts_load_bias(kt_experts *ex, int64_t e, const float *gate_up_bias, const float *down_bias) {
    return guarded([&] {
        check_expert_index(ex, e);
        KT_CHECK(gate_up_bias && down_bias, "gate_up_bias or down_bias pointer is NULL");
        check_aligned(gate_up_bias, "gate_up_bias");
        check_aligned(down_bias, "down_bias");
        if (!ex->has_bias) {
            const int64_t n = ex->E * (2 * ex->I + ex->H);
            ex->bias_base_ = ex->bias.get<float>(n);
            std::fill_n(ex->bias_base_, n, 0.0f);
            ex->has_bias = true;
        }
        std::copy_n(gate_up_bias, 2 * ex->I, ex->bias_base_ + e * 2 * ex->I);
        std::copy_n(down_bias, ex->H, ex->bias_base_ + ex->E * 2 * ex->I + e * ex->H);
    });
}

KT_API kt_status kt_experts_unpack(const kt_experts *ex, int64_t e, uint16_t *gate_up, uint16_t *down) {
    return guarded([&] {
        check_expert_index(ex, e);
        KT_CHECK(ex->loaded[e], "expert %lld has no weights yet", (long long)e);
        KT_CHECK(gate_up && down, "gate_up or down pointer is NULL");
        check_aligned(gate_up, "gate_up");
        check_aligned(down, "down");
        unpack(gate_up, ex->H, ex->gate_up(e));
        unpack(down, ex->I, ex->down(e));
    });
}

KT_API int64_t kt_experts_packed_bytes(const kt_experts *ex) {
    return ex ? ex->E * ex->expert_bytes : 0;   // no throw here: creation checked this product
}

KT_API kt_status kt_experts_forward(kt_experts *ex, uint16_t *y, const kt_saved_activations *saved,
                                    const uint16_t *x, const kt_routing *routing, const kt_lora *lora_gate_up,
                                    const kt_lora *lora_down) {
    return guarded([&] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        ensure_runtime();
        CallInputs in;
        check_call(in, ex, routing, lora_gate_up, lora_down);
        const kt_saved_activations out = saved ? *saved : kt_saved_activations{};   // NULL: save nothing
        KT_CHECK(in.plan.T == 0 || (x && y), "x or y pointer is NULL");
        check_aligned(x, "x");
        check_aligned(y, "y");
        check_saved_aligned(out);
        KT_CHECK(in.lora_gu.r > 0 || !out.lora_gate_up, "saved lora_gate_up must be NULL without a gate_up LoRA");
        KT_CHECK(in.lora_dn.r > 0 || !out.lora_down, "saved lora_down must be NULL without a down LoRA");
        if (in.plan.T == 0) return;
        forward_layer(*ex, y, out, x, in.plan, in.lora_gu, in.lora_dn);
    });
}

KT_API kt_status kt_experts_backward(kt_experts *ex, const kt_gradients *grads, const uint16_t *dy,
                                     const uint16_t *x, const kt_routing *routing, const kt_saved_activations *saved,
                                     const kt_lora *lora_gate_up, const kt_lora *lora_down) {
    return guarded([&] {
        std::lock_guard<std::mutex> lock(runtime_lock());
        ensure_runtime();
        CallInputs in;
        check_call(in, ex, routing, lora_gate_up, lora_down);
        KT_CHECK(grads != nullptr, "grads pointer is NULL");
        const kt_saved_activations in_saved = saved ? *saved : kt_saved_activations{};
        const kt_lora_grad &g_gu = grads->lora_gate_up, &g_dn = grads->lora_down;
        const bool rows = in.plan.T > 0;
        KT_CHECK(!wanted(g_gu) || in.lora_gu.r > 0, "gate_up LoRA gradients asked for without a gate_up LoRA");
        KT_CHECK(!wanted(g_dn) || in.lora_dn.r > 0, "down LoRA gradients asked for without a down LoRA");
        KT_CHECK(!rows || dy, "dy pointer is NULL");
        check_aligned(dy, "dy");
        check_aligned(x, "x");
        check_aligned(grads->dx, "dx");
        check_aligned(grads->dw, "dw");
        check_saved_aligned(in_saved);
        KT_CHECK(aligned(g_gu.dA) && aligned(g_gu.dB) && aligned(g_dn.dA) && aligned(g_dn.dB),
                 "a LoRA dA or dB pointer is not aligned to its 4-byte elements");
        // dB is written with B's strides: through overlapping ones experts would overwrite each other.
        KT_CHECK(!g_gu.dB || !strides_overlap(in.lora_gu, ex->E, 2 * ex->I),
                 "gate_up LoRA B strides overlap (an expanded view?); dB is written with B's strides, so give a B "
                 "whose elements are distinct (e.g. contiguous)");
        KT_CHECK(!g_dn.dB || !strides_overlap(in.lora_dn, ex->E, ex->H),
                 "down LoRA B strides overlap (an expanded view?); dB is written with B's strides, so give a B "
                 "whose elements are distinct (e.g. contiguous)");
        KT_CHECK(!rows || in_saved.gate_up,
                 "saved_gate_up (saved->gate_up) is NULL: the forward must save its activations for a backward");
        KT_CHECK(!rows || !g_gu.dA || x, "x is needed for the gate_up LoRA A gradient");
        KT_CHECK(!rows || !g_gu.dB || in_saved.lora_gate_up,
                 "saved lora_gate_up is needed for the gate_up LoRA B gradient");
        KT_CHECK(!rows || !g_dn.dB || in_saved.lora_down, "saved lora_down is needed for the down LoRA B gradient");
        backward_layer(*ex, *grads, dy, x, in.plan, in_saved, in.lora_gu, in.lora_dn);
    });
}
