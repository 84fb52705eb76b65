/*
 * kt_trl — the C ABI of the native routed-experts engine.
 *
 * One MoE layer: E experts, hidden size H, expert intermediate size I, top-k routing, T tokens.
 *   y[t] = sum_j w[t,j] * Expert_{id[t,j]}(x[t])
 *   Expert_e(x) = down_e( act(gate_e(x), up_e(x)) ),  act(g, u) = silu(g) * u by default
 *   p_e(x) = x W_e^T + s * (x A_e^T) B_e^T     for p in {gate_up, down}, s = alpha / r
 * Base weights are BF16 in the transformers 5 layout: gate_up [E, 2I, H] (gate rows, then up rows),
 * down [E, H, I]. An id equal to E is the "not on this rank" sentinel and contributes nothing.
 *
 * Conventions: every call that can fail returns kt_status; the message of the last failure on the
 * calling thread is kt_last_error(). Sizes are int64_t. Arguments are ordered
 * outputs -> inputs -> sizes. BF16 values travel as uint16_t.
 *
 * The block between the cffi markers is read verbatim by kt_trl/_native/ffi.py as the cffi cdef:
 * plain typedefs, enums with literal values and prototypes only.
 */
#ifndef KT_TRL_H
#define KT_TRL_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cffi-cdef-begin */
typedef int32_t kt_status;

enum {
    KT_ABI_VERSION = 5
};

enum {
    KT_OK = 0,
    KT_ERR_INVALID_ARGUMENT = 1,
    KT_ERR_UNSUPPORTED_ISA = 2,
    KT_ERR_OUT_OF_MEMORY = 3,
    KT_ERR_INTERNAL = 4
};

/* Instruction-set paths, best last. KT_ISA_AUTO picks the best one the CPU supports. */
enum {
    KT_ISA_AUTO = -1,
    KT_ISA_SCALAR = 0,
    KT_ISA_AVX2 = 1,
    KT_ISA_AVX512 = 2,
    KT_ISA_AMX = 3
};

/* Bits of kt_cpu_features(). */
enum {
    KT_CPU_AVX2 = 1,
    KT_CPU_FMA = 2,
    KT_CPU_F16C = 4,
    KT_CPU_AVX512F = 8,
    KT_CPU_AVX512BW = 16,
    KT_CPU_AVX512VL = 32,
    KT_CPU_AVX512_BF16 = 64,
    KT_CPU_AMX_TILE = 128,
    KT_CPU_AMX_BF16 = 256,
    KT_CPU_AMX_PERMITTED = 512,
    KT_CPU_AVX512DQ = 1024
};

enum {
    KT_DTYPE_FP32 = 0,
    KT_DTYPE_BF16 = 1,
    KT_DTYPE_INT32 = 2,
    KT_DTYPE_INT64 = 3
};

/* Storage formats of the frozen expert weights (kt_experts_create). The 8-bit ones hold a code
 * per weight and FP32 scales, one per row and block of block_k values along K:
 *   W[n][k] = bf16(value(code[n][k]) * scale[n][k / block_k])   (FP32 product, rounded once)
 * value() is FP8 E4M3 (torch.float8_e4m3fn; the NaN codes 0x7F, 0xFF are refused) or INT8. The
 * engine computes exactly what it computes on those BF16 weights, reading half the bytes. */
enum {
    KT_FORMAT_BF16 = 0,
    KT_FORMAT_FP8_E4M3 = 1,
    KT_FORMAT_INT8 = 2
};

/* Top-k routing of T tokens: ids [T, k] (INT64 or INT32), weights [T, k] (FP32 or BF16). */
typedef struct {
    const void *ids;
    int32_t ids_dtype;
    const void *weights;
    int32_t weights_dtype;
    int64_t tokens;
    int64_t top_k;
} kt_routing;

/* LoRA factors of one projection for all experts (FP32):
 *   A_e[q][i] = A[(e * rank + q) * in + i]                       A is [E, r, in], contiguous
 *   B_e[o][q] = B[e * B_stride_e + o * B_stride_out + q * B_stride_rank]
 * PEFT's target_parameters layout (lora_B.weight [out, r*E]) is B_stride_e = 1,
 * B_stride_out = r*E, B_stride_rank = E. Gradients dA and dB use the same layouts as A and B. */
typedef struct {
    const float *A;
    const float *B;
    int64_t rank;
    int64_t B_stride_e;
    int64_t B_stride_out;
    int64_t B_stride_rank;
    float scale;
} kt_lora;

/* Gradients of one projection's LoRA factors (FP32, layouts of kt_lora); NULL = not wanted. */
typedef struct {
    float *dA;
    float *dB;
} kt_lora_grad;

/* What a forward saves for its backward, in caller-owned buffers in route order (route = t * k + j):
 *   gate_up       [T*k, 2I] BF16           pre-activation gate | up
 *   lora_gate_up  [T*k, r_gate_up] FP32    x A_gate_up^T   (NULL without a gate_up LoRA)
 *   lora_down     [T*k, r_down] FP32       h A_down^T      (NULL without a down LoRA)
 * Rows of sentinel routes are zeros. */
typedef struct {
    uint16_t *gate_up;
    float *lora_gate_up;
    float *lora_down;
} kt_saved_activations;

/* What a backward writes; any pointer may be NULL to skip that output.
 *   dx [T, H] BF16, dw [T, k] FP32, and the LoRA gradients of each projection (overwritten). */
typedef struct {
    uint16_t *dx;
    float *dw;
    kt_lora_grad lora_gate_up;
    kt_lora_grad lora_down;
} kt_gradients;

/* Gated activations (kt_experts_set_activation). CLAMPED_SWIGLU is gpt-oss's:
 * g' = min(g, limit), u' = clamp(u, -limit, limit), act = (u' + 1) * g' * sigmoid(alpha * g'). */
enum {
    KT_ACT_SILU = 0,
    KT_ACT_CLAMPED_SWIGLU = 1
};

/* Stages of the engine's calls, for kt_profile_read. */
enum {
    KT_STAGE_PLAN = 0,
    KT_STAGE_LORA_PREP = 1,
    KT_STAGE_FWD_GATHER = 2,
    KT_STAGE_FWD_GATE_UP = 3,
    KT_STAGE_FWD_ACT = 4,
    KT_STAGE_FWD_DOWN = 5,
    KT_STAGE_FWD_COMBINE = 6,
    KT_STAGE_BWD_GATHER = 7,
    KT_STAGE_BWD_DOWN_T = 8,
    KT_STAGE_BWD_ACT = 9,
    KT_STAGE_BWD_GATE_UP_T = 10,
    KT_STAGE_BWD_COMBINE = 11,
    KT_STAGE_COUNT = 12
};

typedef struct kt_experts kt_experts;

int32_t kt_abi_version(void);
const char *kt_last_error(void);

/* CPU and runtime. kt_cpu_features and kt_isa_available leave out the features hidden with
 * kt_cpu_hide_features (none by default), and so does the ISA selection of kt_runtime_configure:
 * a test can force a path's refusal on a CPU that has it. */
uint32_t kt_cpu_features(void);
void kt_cpu_hide_features(uint32_t features);
int32_t kt_isa_available(int32_t isa);
int32_t kt_physical_cores(void);
/* Selects the ISA path (KT_ISA_AUTO or one that kt_isa_available) and the worker count
 * (0 = physical cores). Safe to call again; waits for running calls to finish. An engine call
 * made before any kt_runtime_configure configures KT_ISA_AUTO with 0 threads. */
kt_status kt_runtime_configure(int32_t isa, int32_t threads);
/* The configured ISA path and worker count: pure reads, KT_ISA_AUTO and 0 until configured. */
int32_t kt_runtime_isa(void);
int32_t kt_runtime_threads(void);
/* Milliseconds spent in each stage (KT_STAGE_COUNT values) since the last reset, summed over calls. */
void kt_profile_read(double *ms, int32_t reset);

/* Host memory for engine outputs: blocks freed with kt_host_free are cached (up to 2 GiB) and
 * reused, so repeated calls do not pay page faults on fresh memory. */
kt_status kt_host_alloc(void **out, int64_t bytes);
void kt_host_free(void *block);
int64_t kt_host_cached_bytes(void);

/* Engine for one layer's experts, storing the frozen weights in `format` (KT_FORMAT_*); block_k
 * is the 8-bit formats' K values per scale (0 = one scale per row, else a multiple of 16) and
 * must be 0 for BF16. Weights are packed expert by expert from any row-strided source:
 * gate_up_e [2I, H] with row stride gate_up_ld, down_e [H, I] with row stride down_ld; BF16
 * values with kt_experts_load, 8-bit codes with kt_experts_load_8bit and their scales
 * gate_up_scales [2I, ceil(H / block_k)], down_scales [H, ceil(I / block_k)] (contiguous FP32;
 * one column when block_k = 0). */
kt_status kt_experts_create(kt_experts **out, int64_t num_experts, int64_t hidden, int64_t intermediate,
                            int32_t format, int64_t block_k);
/* The same engine over caller-owned memory (e.g. a mapping shared by the processes of a host):
 * at least kt_experts_weight_bytes bytes, 64-byte aligned, alive until kt_experts_destroy. With
 * filled != 0 the memory already holds every expert, packed by an engine of the same sizes and
 * format (another process's), and nothing needs loading. */
kt_status kt_experts_weight_bytes(int64_t *out, int64_t num_experts, int64_t hidden, int64_t intermediate,
                                  int32_t format, int64_t block_k);
kt_status kt_experts_create_in(kt_experts **out, int64_t num_experts, int64_t hidden, int64_t intermediate,
                               int32_t format, int64_t block_k, void *memory, int64_t memory_bytes, int32_t filled);
void kt_experts_destroy(kt_experts *experts);
kt_status kt_experts_load(kt_experts *experts, int64_t expert, const uint16_t *gate_up,
                          int64_t gate_up_ld, const uint16_t *down, int64_t down_ld);
kt_status kt_experts_load_8bit(kt_experts *experts, int64_t expert, const uint8_t *gate_up, int64_t gate_up_ld,
                               const float *gate_up_scales, const uint8_t *down, int64_t down_ld,
                               const float *down_scales);
/* Optional: the activation (default KT_ACT_SILU) and frozen FP32 biases, added to gate_up
 * ([2I], gate then up) and down ([H]) outputs; experts whose biases were never loaded have zeros. */
kt_status kt_experts_set_activation(kt_experts *experts, int32_t kind, float alpha, float limit);
kt_status kt_experts_load_bias(kt_experts *experts, int64_t expert, const float *gate_up_bias, const float *down_bias);
/* The packed weights of one expert back in the layout of kt_experts_load (contiguous BF16 rows;
 * for an 8-bit format the dequantized values the engine computes with). */
kt_status kt_experts_unpack(const kt_experts *experts, int64_t expert, uint16_t *gate_up, uint16_t *down);
int64_t kt_experts_packed_bytes(const kt_experts *experts);

/* Forward: y [T, H] BF16 from x [T, H] BF16. `saved` receives what backward needs; it, or any of
 * its pointers, may be NULL when no backward follows (and its LoRA pointers must be NULL when
 * that LoRA is). */
kt_status kt_experts_forward(kt_experts *experts, uint16_t *y, const kt_saved_activations *saved,
                             const uint16_t *x, const kt_routing *routing,
                             const kt_lora *lora_gate_up, const kt_lora *lora_down);

/* Backward into `grads` (not NULL), given dy [T, H] BF16 and what forward received and saved:
 * saved->gate_up always, x for the gate_up LoRA's dA, saved->lora_* for that LoRA's dB. */
kt_status kt_experts_backward(kt_experts *experts, const kt_gradients *grads, const uint16_t *dy,
                              const uint16_t *x, const kt_routing *routing,
                              const kt_saved_activations *saved, const kt_lora *lora_gate_up,
                              const kt_lora *lora_down);
/* cffi-cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* KT_TRL_H */
