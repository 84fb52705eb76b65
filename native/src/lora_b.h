// Expert LoRA B between the caller's layout (any strides; PEFT's is [out, r*E], experts fastest)
// and the engine's: Bt [E, r, N], one contiguous row of N >= out outputs per (expert, rank).
// Both drivers read Bt (forward: L Bt adds to a GEMM block of outputs; backward: dY Bt^T, a dot
// product along the outputs), and the backward accumulates dB in the same layout.
#pragma once

#include <cstdint>

#include "driver.h"

namespace kt {

// Both projections' B in the engine's layout, in the workspace's buffers: gu [E, r_gu, n_gu] and
// d [E, r_d, n_d], bt[e][q][o] = B_e[o][q] for o < out and 0 up to n = round_up(out, 16).
struct EngineLoraB {
    float *gu = nullptr, *d = nullptr;
    int64_t n_gu = 0, n_d = 0;
};
// Converts the ranks that are not 0, timed as KT_STAGE_LORA_PREP; the buffers live until the next call.
EngineLoraB lora_b_to_engine(const kt_experts &ex, const LoraView &lora_gu, const LoraView &lora_dn);

// dB_e[o][q] (strided like B) = dbt[e][q][o], dbt [E, r, out].
void lora_db_from_engine(float *dB, const float *dbt, const LoraView &l, int64_t E, int64_t out);

}  // namespace kt
