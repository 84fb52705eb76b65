#include "routing.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "error.h"
#include "kernels/bf16.h"

namespace kt {
namespace {

int64_t read_id(const kt_routing *r, int64_t i) {
    return r->ids_dtype == KT_DTYPE_INT64 ? static_cast<const int64_t *>(r->ids)[i]
                                          : static_cast<const int32_t *>(r->ids)[i];
}

float read_weight(const kt_routing *r, int64_t i) {
    return r->weights_dtype == KT_DTYPE_FP32 ? static_cast<const float *>(r->weights)[i]
                                             : bf16_to_float(static_cast<const uint16_t *>(r->weights)[i]);
}

}  // namespace

void plan_routes(RoutePlan &plan, const kt_routing *r, int64_t E) {
    KT_CHECK(r != nullptr, "routing is NULL");
    KT_CHECK(r->tokens >= 0, "routing.tokens must be >= 0, got %lld", (long long)r->tokens);
    KT_CHECK(r->top_k >= 1 && r->top_k <= 64, "routing.top_k must be in [1, 64], got %lld", (long long)r->top_k);
    KT_CHECK(r->tokens <= std::numeric_limits<int64_t>::max() / r->top_k / 65536,
             "routing.tokens = %lld is too large", (long long)r->tokens);
    KT_CHECK(r->ids_dtype == KT_DTYPE_INT64 || r->ids_dtype == KT_DTYPE_INT32,
             "routing ids must be int64 or int32 (dtype code %d)", r->ids_dtype);
    KT_CHECK(r->weights_dtype == KT_DTYPE_FP32 || r->weights_dtype == KT_DTYPE_BF16,
             "routing weights must be float32 or bfloat16 (dtype code %d)", r->weights_dtype);
    const int64_t T = r->tokens, k = r->top_k, n = T * k;
    KT_CHECK(n == 0 || (r->ids && r->weights), "routing ids/weights pointer is NULL");
    const uintptr_t id_align = r->ids_dtype == KT_DTYPE_INT64 ? 8 : 4, w_align = r->weights_dtype == KT_DTYPE_FP32 ? 4 : 2;
    KT_CHECK(reinterpret_cast<uintptr_t>(r->ids) % id_align == 0 && reinterpret_cast<uintptr_t>(r->weights) % w_align == 0,
             "routing ids/weights pointer is not aligned to its elements");
    plan.T = T; plan.k = k; plan.E = E;
    plan.offsets.assign(E + 2, 0);
    plan.weight.resize(n);
    plan.row_of.assign(n, -1);
    for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            const int64_t id = read_id(r, t * k + j);
            KT_CHECK(id >= 0 && id <= E, "expert id %lld at [token %lld, slot %lld] is out of range [0, %lld] "
                     "(%lld = skip)", (long long)id, (long long)t, (long long)j, (long long)E, (long long)E);
            for (int64_t jj = 0; jj < j && id < E; ++jj)
                KT_CHECK(read_id(r, t * k + jj) != id, "expert %lld appears twice in the top-k row of token %lld",
                         (long long)id, (long long)t);
            const float w = read_weight(r, t * k + j);
            KT_CHECK(std::isfinite(w), "routing weight at [token %lld, slot %lld] is not finite", (long long)t, (long long)j);
            plan.weight[t * k + j] = w;
            ++plan.offsets[id + 1];
        }
    }
    for (int64_t e = 0; e < E; ++e) plan.offsets[e + 1] += plan.offsets[e];
    plan.offsets.resize(E + 1);
    plan.route.resize(plan.offsets[E]);
    std::vector<int64_t> fill(plan.offsets.begin(), plan.offsets.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
        const int64_t id = read_id(r, i);
        if (id == E) continue;
        plan.row_of[i] = fill[id];
        plan.route[fill[id]++] = i;
    }
    plan.order.resize(E);
    for (int64_t e = 0; e < E; ++e) plan.order[e] = e;
    std::stable_sort(plan.order.begin(), plan.order.end(),
                     [&](int64_t a, int64_t b) { return plan.count(a) > plan.count(b); });
}

BlockItems block_items(const RoutePlan &plan, int64_t N, int64_t block, int64_t whole_rows) {
    BlockItems items;
    for (int64_t e : plan.order) {
        if (plan.count(e) == 0) break;
        const int64_t step = plan.count(e) <= whole_rows ? N : block;
        for (int64_t c = 0; c < N; c += step) {
            items.expert.push_back(e);
            items.col0.push_back(c);
            items.cols.push_back(std::min(step, N - c));
        }
    }
    return items;
}

}  // namespace kt
