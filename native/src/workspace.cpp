#include "workspace.h"

#include <sys/mman.h>

#include <cstdlib>

#include "error.h"

namespace kt {

Buffer::~Buffer() { release(); }

void Buffer::release() {
    std::free(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
}

void *Buffer::reserve(size_t bytes) {
    if (bytes <= bytes_ && ptr_) return ptr_;
    release();
    // Large buffers (packed weights, gathered activations) are 2 MiB aligned and asked to be
    // backed by huge pages: an AMX tile load touches 16 rows, often 16 different 4 KiB pages.
    constexpr size_t kHuge = size_t(2) << 20;
    const bool huge = bytes >= 2 * kHuge;
    const size_t align = huge ? kHuge : 64;
    const size_t rounded = (bytes + 64 + align - 1) / align * align;
    ptr_ = std::aligned_alloc(align, rounded);
    if (!ptr_) fail(KT_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes of scratch memory", rounded);
    if (huge) madvise(ptr_, rounded, MADV_HUGEPAGE);
    bytes_ = rounded;
    return ptr_;
}

Workspace &workspace() {
    static Workspace ws;
    return ws;
}

}  // namespace kt
