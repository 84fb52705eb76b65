#include "workspace.h"

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
    const size_t rounded = (bytes + 63) / 64 * 64 + 64;
    ptr_ = std::aligned_alloc(64, rounded);
    if (!ptr_) fail(KT_ERR_OUT_OF_MEMORY, "could not allocate %zu bytes of scratch memory", rounded);
    bytes_ = rounded;
    return ptr_;
}

Workspace &workspace() {
    static Workspace ws;
    return ws;
}

}  // namespace kt
