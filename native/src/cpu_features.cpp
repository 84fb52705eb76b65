#include "cpu_features.h"

#include <cpuid.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <mutex>
#include <set>
#include <utility>

#include "kt_trl.h"

namespace kt {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;   // asm/prctl.h, Linux >= 5.16
constexpr int kXfeatureXtileData = 18;

uint64_t read_xcr0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (static_cast<uint64_t>(edx) << 32) | eax;
}

uint32_t detect() {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const bool osxsave = c & (1u << 27);
    const bool fma = c & (1u << 12), f16c = c & (1u << 29);
    if (!osxsave) return 0;
    const uint64_t xcr0 = read_xcr0();
    const bool ymm_os = (xcr0 & 0x6) == 0x6;             // SSE + AVX state
    const bool zmm_os = (xcr0 & 0xe6) == 0xe6;           // + opmask, ZMM_Hi256, Hi16_ZMM
    const bool tile_os = (xcr0 & 0x60000) == 0x60000;    // XTILECFG + XTILEDATA
    uint32_t f = 0;
    if (!ymm_os) return 0;
    if (fma) f |= KT_CPU_FMA;
    if (f16c) f |= KT_CPU_F16C;
    if (__get_cpuid_max(0, nullptr) < 7) return f;
    __cpuid_count(7, 0, a, b, c, d);
    if (b & (1u << 5)) f |= KT_CPU_AVX2;
    if (zmm_os) {
        if (b & (1u << 16)) f |= KT_CPU_AVX512F;
        if (b & (1u << 30)) f |= KT_CPU_AVX512BW;
        if (b & (1u << 31)) f |= KT_CPU_AVX512VL;
        if (b & (1u << 17)) f |= KT_CPU_AVX512DQ;
    }
    const bool amx_tile = d & (1u << 24), amx_bf16 = d & (1u << 22);
    if (tile_os && amx_tile) f |= KT_CPU_AMX_TILE;
    if (tile_os && amx_bf16) f |= KT_CPU_AMX_BF16;
    unsigned a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    if (zmm_os && (a1 & (1u << 5))) f |= KT_CPU_AVX512_BF16;
    return f;
}

}  // namespace

bool request_amx_permission() {
    static std::once_flag once;
    static bool granted = false;
    std::call_once(once, [] {
        if (!(detect() & KT_CPU_AMX_TILE)) return;
        granted = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) == 0;
    });
    return granted;
}

namespace {
std::atomic<uint32_t> g_hidden{0};
}  // namespace

void hide_cpu_features(uint32_t features) { g_hidden.store(features); }

uint32_t cpu_features() {
    static const uint32_t base = detect();
    uint32_t f = base;
    if ((f & KT_CPU_AMX_TILE) && request_amx_permission()) f |= KT_CPU_AMX_PERMITTED;
    return f & ~g_hidden.load();
}

namespace {

int read_topology(int cpu, const char *field, int fallback) {
    char path[128];
    std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu%d/topology/%s", cpu, field);
    int value = fallback;
    if (FILE *fp = std::fopen(path, "r")) {
        if (std::fscanf(fp, "%d", &value) != 1) value = fallback;
        std::fclose(fp);
    }
    return value;
}

}  // namespace

std::vector<int> cpus_by_core() {
    cpu_set_t set;
    CPU_ZERO(&set);
    std::vector<int> primary, siblings;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return primary;
    std::set<std::pair<int, int>> seen;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (!CPU_ISSET(cpu, &set)) continue;
        const auto core = std::make_pair(read_topology(cpu, "physical_package_id", 0), read_topology(cpu, "core_id", -1 - cpu));
        (seen.insert(core).second ? primary : siblings).push_back(cpu);
    }
    primary.insert(primary.end(), siblings.begin(), siblings.end());
    return primary;
}

int physical_cores() {
    const std::vector<int> cpus = cpus_by_core();
    std::set<std::pair<int, int>> cores;
    for (int cpu : cpus) cores.insert({read_topology(cpu, "physical_package_id", 0), read_topology(cpu, "core_id", -1 - cpu)});
    return cores.empty() ? 1 : static_cast<int>(cores.size());
}

}  // namespace kt
