// Top-k routing -> per-expert lists of routes (route = t * k + j), validated.
#pragma once

#include <cstdint>
#include <vector>

#include "kt_trl.h"

namespace kt {

struct RoutePlan {
    int64_t T = 0, k = 0, E = 0;
    std::vector<int64_t> offsets;   // [E + 1]: expert e owns sorted rows offsets[e] .. offsets[e+1]-1
    std::vector<int64_t> route;     // [Nr]: route id of each sorted row (ascending within an expert)
    std::vector<int64_t> order;     // [E]: experts by decreasing token count (ties by id)
    std::vector<float> weight;      // [T * k]: routing weights as FP32
    std::vector<int64_t> row_of;    // [T * k]: sorted row of a route, -1 for the sentinel

    int64_t rows() const { return static_cast<int64_t>(route.size()); }
    int64_t count(int64_t e) const { return offsets[e + 1] - offsets[e]; }
};

// Validates ids (in [0, E], no expert twice in a row) and weights, and builds the plan.
void plan_routes(RoutePlan &plan, const kt_routing *routing, int64_t E);

// A list of (expert, column block) work items, largest experts first.
struct BlockItems {
    std::vector<int64_t> expert, col0, cols;
    int64_t size() const { return static_cast<int64_t>(expert.size()); }
};
// Experts with at most whole_rows rows (and some) get one item over all N columns.
BlockItems block_items(const RoutePlan &plan, int64_t N, int64_t block, int64_t whole_rows = 0);

}  // namespace kt
