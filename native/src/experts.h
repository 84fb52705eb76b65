// The packed frozen weights of one layer's experts.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"
#include "pack.h"
#include "packed_weight.h"
#include "workspace.h"

struct kt_experts {
    int64_t E = 0, H = 0, I = 0;
    int64_t Hp = 0;        // round_up(H, 32): K of the gate_up GEMM, row width of gathered x / dy
    int64_t Ip = 0;        // round_up(I, 32): K of the down GEMM, row width of h
    int64_t GUp = 0;       // round_up(2I, 32): row width of the gate_up activations (K of dX)
    // Row strides of the gathered GEMM operands (x and dY, h, dGU): the padded width plus 64 bytes,
    // because a stride that is a multiple of 4 KiB maps all 16 rows of an AMX A tile (or a
    // register block) to one L1 set.
    int64_t ldx = 0, ldh = 0, ldgu = 0;
    kt::WeightLayout gu_layout, d_layout;   // gate_up [2I, H] and down [H, I] of one expert, in one format
    int64_t expert_bytes = 0;               // both projections of one expert, 64-byte aligned
    kt::Buffer packed;     // E x (gate_up, down) in expert_bytes each
    kt::Activation act;
    kt::Buffer bias;       // FP32 [E, 2I] gate_up then [E, H] down, when has_bias
    bool has_bias = false;
    const float *bias_gate_up(int64_t e) const { return bias_base_ + e * 2 * I; }
    const float *bias_down(int64_t e) const { return bias_base_ + E * 2 * I + e * H; }
    float *bias_base_ = nullptr;
    std::vector<uint8_t> loaded;
    uint8_t *base_ = nullptr;

    int32_t format() const { return gu_layout.format; }   // KT_FORMAT_*: how the frozen weights are stored
    kt::PackedWeight gate_up(int64_t e) const { return gu_layout.at(base_ + e * expert_bytes); }
    kt::PackedWeight down(int64_t e) const { return d_layout.at(base_ + e * expert_bytes + gu_layout.bytes()); }
};
