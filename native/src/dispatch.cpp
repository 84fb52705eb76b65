#include "dispatch.h"

#include <pthread.h>

#include "cpu_features.h"
#include "error.h"
#include "thread_pool.h"

namespace kt {
namespace {

// Written only under the runtime lock.
Runtime g_runtime{&kernels_scalar, KT_ISA_AUTO, 0};

const char *isa_name(int32_t isa) {
    switch (isa) {
        case KT_ISA_AMX: return "amx";
        case KT_ISA_AVX512: return "avx512";
        case KT_ISA_AVX2: return "avx2";
        case KT_ISA_SCALAR: return "scalar";
        default: return "unknown";
    }
}

}  // namespace

const Kernels &kernels_for(int32_t isa) {
    switch (isa) {
        case KT_ISA_AMX: return kernels_amx;
        case KT_ISA_AVX512: return kernels_avx512;
        case KT_ISA_AVX2: return kernels_avx2;
        default: return kernels_scalar;
    }
}

// Each path needs every feature its file is compiled for (CMakeLists.txt).
bool isa_available(int32_t isa) {
    const uint32_t f = cpu_features();
    const uint32_t avx2 = KT_CPU_AVX2 | KT_CPU_FMA | KT_CPU_F16C;
    const uint32_t avx512 =
        avx2 | KT_CPU_AVX512F | KT_CPU_AVX512BW | KT_CPU_AVX512VL | KT_CPU_AVX512DQ | KT_CPU_AVX512_BF16;
    switch (isa) {
        case KT_ISA_SCALAR: return true;
        case KT_ISA_AVX2: return (f & avx2) == avx2;
        case KT_ISA_AVX512: return (f & avx512) == avx512;
        case KT_ISA_AMX: {
            const uint32_t amx = avx512 | KT_CPU_AMX_TILE | KT_CPU_AMX_BF16;
            return (f & amx) == amx && request_amx_permission();
        }
        default: return false;
    }
}

int32_t best_isa() {
    for (int32_t isa : {KT_ISA_AMX, KT_ISA_AVX512, KT_ISA_AVX2})
        if (isa_available(isa)) return isa;
    return KT_ISA_SCALAR;
}

void configure(int32_t isa, int32_t threads) {
    KT_CHECK(isa >= KT_ISA_AUTO && isa <= KT_ISA_AMX, "unknown ISA code %d; use auto, amx, avx512, avx2 or scalar", isa);
    KT_CHECK(threads >= 0 && threads <= 4096, "threads must be in [0, 4096] (0 = one per physical core), got %d", threads);
    if (isa == KT_ISA_AUTO) isa = best_isa();
    if (!isa_available(isa))
        fail(KT_ERR_UNSUPPORTED_ISA, "this CPU does not support the '%s' path (best available: '%s')",
             isa_name(isa), isa_name(best_isa()));
    const int n = threads > 0 ? threads : physical_cores();
    ThreadPool::resize(n);
    g_runtime = Runtime{&kernels_for(isa), isa, n};
}

Runtime runtime() { return g_runtime; }

void ensure_runtime() {
    if (g_runtime.isa == KT_ISA_AUTO) configure(KT_ISA_AUTO, 0);
}

std::mutex &runtime_lock() {
    static std::mutex *mu = [] {
        // fork() while another thread is inside an engine call would leave the child with a locked
        // mutex and no owner: take the lock around fork so the child starts with it free.
        pthread_atfork([] { runtime_lock().lock(); }, [] { runtime_lock().unlock(); },
                       [] { runtime_lock().unlock(); });
        return new std::mutex();
    }();
    return *mu;
}

}  // namespace kt
