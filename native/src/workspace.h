// Grow-only scratch memory reused across calls, so that large transient buffers are allocated
// (and page-faulted) once per process rather than once per layer call. The runtime lock
// (dispatch.h) serialises calls, so one Workspace serves every engine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace kt {

class Buffer {
public:
    Buffer() = default;
    Buffer(const Buffer &) = delete;
    Buffer &operator=(const Buffer &) = delete;
    Buffer(Buffer &&other) noexcept : ptr_(other.ptr_), bytes_(other.bytes_) { other.ptr_ = nullptr; other.bytes_ = 0; }
    ~Buffer();
    // Pointer to at least n elements of T, 64-byte aligned; contents are unspecified.
    template <typename T>
    T *get(int64_t n) { return static_cast<T *>(reserve(static_cast<size_t>(n) * sizeof(T))); }
    void release();

private:
    void *reserve(size_t bytes);
    void *ptr_ = nullptr;
    size_t bytes_ = 0;
};

// Per-thread scratch of the drivers; one field per buffer.
struct ThreadScratch {
    Buffer tile;       // FP32 [rows, 64] GEMM output block
    Buffer panels;     // BF16 transposed weight panels of one column block (pack_transposed_block)
    Buffer rows_a;     // FP32 [rows, width] converted activation rows (x, h)
    Buffer rows_b;     // FP32 [rows, width] converted gradient rows (w dY, dGU)
    Buffer rows_c;     // FP32 [rows, width] third operand rows (x in backward)
    Buffer lora_rows;  // FP32 [rows, 2r] saved LoRA intermediates of one chunk
};

struct Workspace {
    Buffer slots[10];                     // large per-call buffers; the drivers name their uses
    std::vector<ThreadScratch> threads;   // one per worker
    void ensure_threads(int n) { if (static_cast<int>(threads.size()) < n) threads.resize(n); }
};

Workspace &workspace();

}  // namespace kt
