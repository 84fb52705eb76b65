// CPU feature detection (CPUID + XCR0) and the Linux AMX permission request.
// cpu_features.cpp is compiled without ISA flags, so calling these never raises SIGILL.
#pragma once

#include <cstdint>
#include <vector>

namespace kt {

// KT_CPU_* bits of kt_trl.h, less those hidden with hide_cpu_features. KT_CPU_AMX_PERMITTED is
// set once the kernel granted this process the AMX tile state (request_amx_permission).
uint32_t cpu_features();

// From now on cpu_features() leaves out these KT_CPU_* bits (0 = none): for tests that force a
// path's refusal on a CPU that has it. The caller passes them explicitly (kt_cpu_hide_features);
// the library reads no environment variable.
void hide_cpu_features(uint32_t features);

// Asks Linux for the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM); idempotent.
bool request_amx_permission();

// Physical cores available to this process (distinct core ids among the allowed CPUs).
int physical_cores();

// The CPUs this process may run on, one per physical core first, then their SMT siblings.
std::vector<int> cpus_by_core();

}  // namespace kt
