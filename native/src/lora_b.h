// Expert LoRA B between the caller's layout (any strides; PEFT's is [out, r*E], experts fastest)
// and the engine's: Bt [E, r, N], one contiguous row of N >= out outputs per (expert, rank).
// Both drivers read Bt (forward: L Bt adds to a GEMM block of outputs; backward: dY Bt^T, a dot
// product along the outputs), and the backward accumulates dB in the same layout.
#pragma once

#include <cstdint>

#include "driver.h"

namespace kt {

// bt[e][q][o] = B_e[o][q] for o < out, 0 for out <= o < N.
void lora_b_to_engine(float *bt, const LoraView &l, int64_t E, int64_t out, int64_t N);

// dB_e[o][q] (strided like B) = dbt[e][q][o], dbt [E, r, out].
void lora_db_from_engine(float *dB, const float *dbt, const LoraView &l, int64_t E, int64_t out);

}  // namespace kt
