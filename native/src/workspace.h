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
    Buffer decoded;    // BF16 panels of one column block of an 8-bit weight (bf16_panels)
    Buffer rows_a;     // FP32 [rows, width] converted activation rows (x, h)
    Buffer rows_b;     // FP32 [rows, width] converted gradient rows (w dY, dGU)
    Buffer rows_c;     // FP32 [rows, width] third operand rows (x in backward)
    Buffer lora_rows;  // FP32 [rows, 2r] saved LoRA intermediates of one chunk
};

// The large per-call buffers of the drivers. Nr = rows of the call's plan (routes to a real
// expert, sorted by expert), r_gu and r_d the LoRA ranks, ld* the row strides of kt_experts.
// A forward and a backward are never in flight at once (runtime lock), so where the two need a
// buffer of the same size and role they share one field: the per-route rows alone are
// T*k*H*4 bytes, and separate buffers would hold twice the memory for nothing.
struct Workspace {
    Buffer gathered;         // BF16 [Nr, Hp], stride ldx: forward x rows, backward dY rows
    Buffer gate_up;          // BF16 [Nr, 2I]: forward gate | up when the caller saves none (stride GUp);
                             //   backward dGU = [dg | du] (stride ldgu)
    Buffer inter;            // [Nr, I]: forward h BF16 (stride ldh); backward G = dY W_d,eff FP32 (stride Ip)
    Buffer lora_gate_up;     // FP32 [Nr, r_gu]: forward x A_gu^T; backward dGU B_gu
    Buffer lora_down;        // FP32 [Nr, r_d]: forward h A_d^T; backward dY B_d
    Buffer routes;           // FP32 [T*k, H]: forward expert outputs, backward dX, one row per route
    Buffer lora_b_gate_up;   // FP32 B_gu in the engine's layout (lora_b.h) [E, r_gu, round_up(2I, 16)]
    Buffer lora_b_down;      // FP32 B_d [E, r_d, round_up(H, 16)]
    Buffer lora_db_gate_up;  // FP32 [E, r_gu, 2I]: backward dB_gu per expert, before it is stored
    Buffer lora_db_down;     // FP32 [E, r_d, H]: backward dB_d per expert
    std::vector<ThreadScratch> threads;   // one per worker
    void ensure_threads(int n) { if (static_cast<int>(threads.size()) < n) threads.resize(n); }
};

Workspace &workspace();

}  // namespace kt
