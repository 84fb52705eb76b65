// The runtime: which kernel table is in use, how many workers, and the lock that serialises
// engine calls (they share the thread pool and the workspace).
#pragma once

#include <cstdint>
#include <mutex>

#include "kernels.h"
#include "kernels/transpose.h"

namespace kt {

bool isa_available(int32_t isa);
int32_t best_isa();

// Selects isa (KT_ISA_AUTO or an available one) and threads (0 = physical cores).
void configure(int32_t isa, int32_t threads);

struct Runtime {
    const Kernels *kernels;
    TransposeBlockFn transpose_block;
    int32_t isa;
    int threads;
};

// The active runtime; configures the defaults on first use.
Runtime runtime();
std::mutex &runtime_lock();

}  // namespace kt
