// The runtime: which kernel table is in use, how many workers, and the lock that serialises
// engine calls (they share the thread pool and the workspace).
#pragma once

#include <cstdint>
#include <mutex>

#include "kernels.h"

namespace kt {

// Whether the CPU (less its hidden features, cpu_features.h) runs the KT_ISA_* path isa.
bool isa_available(int32_t isa);
int32_t best_isa();

// The kernel table of a KT_ISA_* path (not KT_ISA_AUTO); the caller checks isa_available first.
const Kernels &kernels_for(int32_t isa);

// Selects isa (KT_ISA_AUTO or an available one) and threads (0 = physical cores).
void configure(int32_t isa, int32_t threads);

struct Runtime {
    const Kernels *kernels;
    int32_t isa;   // KT_ISA_AUTO until configured
    int threads;   // 0 until configured
};

// The active runtime; an engine call configures the defaults first if nothing did (ensure_runtime).
Runtime runtime();
void ensure_runtime();
std::mutex &runtime_lock();

}  // namespace kt
