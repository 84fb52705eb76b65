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
// Covers the outputs of a few layer calls at training sizes. Cached blocks are memory nothing
// else accounts for: a larger cache would keep, through the optimizer step, the activations the
// whole backward has just freed.
constexpr int64_t kCacheLimit = int64_t(2) << 30;

void *map_block(int64_t size) {
    void *block = mmap(nullptr, static_cast<size_t>(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return block == MAP_FAILED ? nullptr : block;
}

class HostPool {
public:
    // A block of at least `bytes` (rounded up to huge pages), from the cache when one fits exactly.
    void *alloc(int64_t bytes) {
        const int64_t size = (std::max<int64_t>(bytes, 1) + kHugePage - 1) / kHugePage * kHugePage;
        std::lock_guard<std::mutex> lock(mu_);
        void *block = take_cached(size);
        if (!block) {
            block = map_block(size);
            if (!block) {
                trim_to(0);   // give the cache back and try once more
                block = map_block(size);
            }
            if (!block) fail(KT_ERR_OUT_OF_MEMORY, "could not map host memory for an engine output");
            madvise(block, static_cast<size_t>(size), MADV_HUGEPAGE);
        }
        try {
            live_.emplace(block, size);
        } catch (...) {
            munmap(block, static_cast<size_t>(size));
            throw;
        }
        return block;
    }

    // Returns a block of alloc() to the cache; other pointers are ignored rather than corrupt the heap.
    void free(void *block) {
        std::lock_guard<std::mutex> lock(mu_);
        auto it = live_.find(block);
        if (it == live_.end()) return;
        const int64_t size = it->second;
        live_.erase(it);
        try {
            free_blocks_.emplace(size, block);
        } catch (...) {   // no memory to cache it: unmap it instead
            munmap(block, static_cast<size_t>(size));
            throw;
        }
        cached_bytes_ += size;
        trim_to(kCacheLimit);
    }

    int64_t cached_bytes() {
        std::lock_guard<std::mutex> lock(mu_);
        return cached_bytes_;
    }

private:
    void *take_cached(int64_t size) {   // under mu_
        auto it = free_blocks_.find(size);
        if (it == free_blocks_.end()) return nullptr;
        void *block = it->second;
        free_blocks_.erase(it);
        cached_bytes_ -= size;
        return block;
    }

    void trim_to(int64_t limit) {   // under mu_; largest blocks go first
        while (cached_bytes_ > limit && !free_blocks_.empty()) {
            auto it = std::prev(free_blocks_.end());
            munmap(it->second, static_cast<size_t>(it->first));
            cached_bytes_ -= it->first;
            free_blocks_.erase(it);
        }
    }

    std::mutex mu_;
    std::multimap<int64_t, void *> free_blocks_;   // size -> block
    std::unordered_map<void *, int64_t> live_;      // block -> size
    int64_t cached_bytes_ = 0;
};

HostPool &pool() {
    static HostPool *p = new HostPool();   // never destroyed: blocks may be freed at interpreter exit
    return *p;
}

}  // namespace
}  // namespace kt

using namespace kt;

KT_API kt_status kt_host_alloc(void **out, int64_t bytes) {
    return guarded([&] {
        KT_CHECK(out != nullptr, "output pointer is NULL");
        *out = nullptr;
        KT_CHECK(bytes >= 0 && bytes <= (int64_t(1) << 46), "host allocation size out of range");
        *out = pool().alloc(bytes);
    });
}

KT_API void kt_host_free(void *block) {
    if (block) guarded_or([&] { pool().free(block); });
}

KT_API int64_t kt_host_cached_bytes(void) {
    return guarded_or<int64_t>(-1, [] { return pool().cached_bytes(); });
}
