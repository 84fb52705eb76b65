// Host memory for the tensors the engine returns (outputs, saved activations, gradients).
//
// Fresh memory from the kernel costs a page fault plus zeroing per 4 KiB on first touch: for the
// hundreds of MB a layer call returns that is tens of ms, every call. Blocks freed by Python (when
// the tensor that owns them dies) go back to a cache keyed by size and are handed out again, so in
// steady-state training the same blocks cycle between layers and steps with no faults. Large
// blocks are mmap'ed with MADV_HUGEPAGE (a fault per 2 MiB when they are touched the first time).
#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

#include "error.h"
#include "kt_trl.h"

namespace kt {
namespace {

constexpr int64_t kHugePage = int64_t(2) << 20;

struct HostPool {
    std::mutex mu;
    std::multimap<int64_t, void *> free_blocks;   // size -> block
    std::unordered_map<void *, int64_t> live;      // block -> size
    int64_t cached_bytes = 0;
    // Covers the outputs of a few layer calls at training sizes. Cached blocks are memory nothing
    // else accounts for: a larger cache would keep, through the optimizer step, the activations
    // the whole backward has just freed.
    int64_t cache_limit = int64_t(2) << 30;

    void trim_to(int64_t limit) {   // under mu; largest blocks go first
        while (cached_bytes > limit && !free_blocks.empty()) {
            auto it = std::prev(free_blocks.end());
            munmap(it->second, static_cast<size_t>(it->first));
            cached_bytes -= it->first;
            free_blocks.erase(it);
        }
    }
};

HostPool &pool() {
    static HostPool *p = new HostPool();   // never destroyed: blocks may be freed at interpreter exit
    return *p;
}

}  // namespace
}  // namespace kt

using namespace kt;

extern "C" __attribute__((visibility("default"))) kt_status kt_host_alloc(void **out, int64_t bytes) {
    if (!out) {
        set_last_error("output pointer is NULL");
        return KT_ERR_INVALID_ARGUMENT;
    }
    *out = nullptr;
    if (bytes < 0 || bytes > (int64_t(1) << 46)) {
        set_last_error("host allocation size out of range");
        return KT_ERR_INVALID_ARGUMENT;
    }
    const int64_t size = (std::max<int64_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
    HostPool &p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free_blocks.find(size);
    void *block;
    if (it != p.free_blocks.end()) {
        block = it->second;
        p.free_blocks.erase(it);
        p.cached_bytes -= size;
    } else {
        block = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (block == MAP_FAILED) {
            p.trim_to(0);   // give the cache back and try once more
            block = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (block == MAP_FAILED) {
                set_last_error("could not map host memory for an engine output");
                return KT_ERR_OUT_OF_MEMORY;
            }
        }
        madvise(block, static_cast<size_t>(size), MADV_HUGEPAGE);
    }
    p.live[block] = size;
    *out = block;
    return KT_OK;
}

extern "C" __attribute__((visibility("default"))) void kt_host_free(void *block) {
    if (!block) return;
    HostPool &p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.live.find(block);
    if (it == p.live.end()) return;   // not ours: ignore rather than corrupt the heap
    const int64_t size = it->second;
    p.live.erase(it);
    p.free_blocks.emplace(size, block);
    p.cached_bytes += size;
    p.trim_to(p.cache_limit);
}

extern "C" __attribute__((visibility("default"))) void kt_host_cache_limit(int64_t bytes) {
    HostPool &p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    p.cache_limit = bytes < 0 ? 0 : bytes;
    p.trim_to(p.cache_limit);
}

extern "C" __attribute__((visibility("default"))) int64_t kt_host_cached_bytes(void) {
    HostPool &p = pool();
    std::lock_guard<std::mutex> lock(p.mu);
    return p.cached_bytes;
}
