"""Typed wrappers of the C ABI: the only module that calls into the library.

Every wrapper validates device, dtype, shape and layout before the cast (`pointers`), keeps the tensors alive
for the call, and turns a failing status into an exception (errors.check). Enum values are the
library's ``KT_*`` constants, never copies. Checks cost O(number of tensors), never O(elements).
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from ..formats import scale_blocks
from . import isa as isa_mod
from .errors import check
from .ffi import load
from .pointers import _as_int, as_ptr, check_disjoint, check_tensor

# The KT_FORMAT_* constant of each storage format of the frozen weights, and its 8-bit code dtype.
FORMAT_CONSTANTS = {"bf16": "KT_FORMAT_BF16", "fp8": "KT_FORMAT_FP8_E4M3", "int8": "KT_FORMAT_INT8"}
# The KT_DTYPE_* constant of each dtype the engine reads (routing ids and weights).
DTYPE_CONSTANTS = {torch.float32: "KT_DTYPE_FP32", torch.bfloat16: "KT_DTYPE_BF16", torch.int32: "KT_DTYPE_INT32",
                   torch.int64: "KT_DTYPE_INT64"}


_ELEM_SIZE = {torch.bfloat16: 2, torch.float32: 4}


def host_empty(shape, dtype: torch.dtype = torch.float32, stride=None) -> torch.Tensor:
    """An uninitialised CPU tensor in the engine's cached host memory (no page faults on reuse).

    The memory returns to the cache when the tensor (and every view of it) is freed.
    """
    ffi, lib = load()
    if dtype not in _ELEM_SIZE:
        raise TypeError(f"host_empty allocates {list(_ELEM_SIZE)}, got dtype {dtype}")
    shape = tuple(map(operator.index, shape))   # TypeError for a size that is not an int
    stride = tuple(map(operator.index, stride)) if stride is not None else None
    if min(shape + (stride or ()), default=0) < 0 or stride is not None and len(stride) != len(shape):
        raise ValueError(f"host_empty: sizes {shape} and strides {stride} must be >= 0, one stride a size")
    if stride is None:
        numel = math.prod(shape)
    else:   # storage span of a strided layout
        numel = 1 + sum((d - 1) * st for d, st in zip(shape, stride)) if all(shape) else 0
    nbytes = numel * _ELEM_SIZE[dtype]
    out = ffi.new("void **")
    check(lib, ffi, lib.kt_host_alloc(out, min(nbytes, 1 << 62)), "kt_host_alloc")   # C refuses > 2^46
    block = ffi.gc(ffi.cast("char *", out[0]), lib.kt_host_free)
    flat = torch.frombuffer(ffi.buffer(block, max(nbytes, 1)), dtype=torch.uint8)[:nbytes].view(dtype)
    return flat.view(shape) if stride is None else flat.as_strided(shape, stride)


@functools.lru_cache(maxsize=None)
def constants(prefix: str) -> dict[str, int]:
    """The library's ``KT_<prefix>_*`` constants as ``{lower-case suffix: value}``, by value.

    E.g. ``constants("CPU")["amx_bf16"] == lib.KT_CPU_AMX_BF16``; ``KT_*_COUNT`` is left out.
    """
    _, lib = load()
    start = f"KT_{prefix}_"
    names = [n for n in dir(lib) if n.startswith(start) and n != f"KT_{prefix}_COUNT"]
    return {n[len(start):].lower(): int(getattr(lib, n)) for n in sorted(names, key=lambda n: getattr(lib, n))}


def _isa_code(name: str) -> int:
    codes = constants("ISA")
    if name not in codes:
        raise ValueError(f"unknown ISA {name!r}; use one of {tuple(codes)}")
    return codes[name]


def _runtime_lib():
    """``(ffi, lib)`` with ``KT_TRL_HIDE_CPU_FEATURES`` applied: for the calls that read or select ISA paths."""
    ffi, lib = load()
    bits = constants("CPU")
    hidden = 0
    for name in isa_mod.hidden_cpu_features():
        if name not in bits:
            raise ValueError(f"KT_TRL_HIDE_CPU_FEATURES names an unknown CPU feature {name!r}; "
                             f"use some of {tuple(bits)}")
        hidden |= bits[name]
    lib.kt_cpu_hide_features(hidden)
    return ffi, lib


def runtime_configure(isa: str, threads: int) -> None:
    """Selects the ISA path (a name of ``isa.ISA_CHOICES``) and the worker count (0 = physical cores)."""
    ffi, lib = _runtime_lib()
    status = lib.kt_runtime_configure(_isa_code(isa), _as_int(threads, "threads", -(1 << 31), (1 << 31) - 1))
    check(lib, ffi, status, "configure")


def isa_available(name: str) -> bool:
    _, lib = _runtime_lib()
    return bool(lib.kt_isa_available(_isa_code(name)))


def cpu_info() -> dict:
    _, lib = _runtime_lib()
    bits = lib.kt_cpu_features()
    isa_names = {code: name for name, code in constants("ISA").items()}
    return {
        "isa": isa_names[lib.kt_runtime_isa()],
        "threads": int(lib.kt_runtime_threads()),
        "physical_cores": int(lib.kt_physical_cores()),
        "cpu_features": [n for n, b in constants("CPU").items() if bits & b],
    }


# (E, H, I) of each live engine handle, by address. The C struct is opaque, and a wrapper that
# trusted its caller's sizes would let the library run past buffers sized for other ones: every
# wrapper checks them against these. An entry leaves with its handle (the ffi.gc destructor).
_HANDLE_DIMS: dict[int, tuple[int, int, int]] = {}


def _format_args(lib, num_experts, hidden, intermediate, format, block_k) -> tuple:
    dims = (_as_int(num_experts, "num_experts"), _as_int(hidden, "hidden size"),
            _as_int(intermediate, "intermediate size"))
    if format not in FORMAT_CONSTANTS:
        raise ValueError(f"unknown weight format {format!r}; use one of {sorted(FORMAT_CONSTANTS)}")
    return dims, (getattr(lib, FORMAT_CONSTANTS[format]), _as_int(block_k, "block_k"))


def experts_weight_bytes(num_experts: int, hidden: int, intermediate: int, format: str = "bf16",
                         block_k: int = 0) -> int:
    """Bytes of the packed weights of an engine of these sizes and format (the memory of `experts_create_in`)."""
    ffi, lib = load()
    dims, fmt = _format_args(lib, num_experts, hidden, intermediate, format, block_k)
    out = ffi.new("int64_t *")
    check(lib, ffi, lib.kt_experts_weight_bytes(out, *dims, *fmt), "kt_experts_weight_bytes")
    return int(out[0])


def experts_create(num_experts: int, hidden: int, intermediate: int, format: str = "bf16", block_k: int = 0,
                   memory: torch.Tensor | None = None, filled: bool = False):
    """A ``kt_experts`` handle storing the weights in ``format`` (a key of `FORMAT_CONSTANTS`), destroyed
    when garbage-collected; over ``memory`` (a uint8 CPU tensor the caller keeps alive, e.g. a shared
    mapping; ``filled``: it holds every expert already) or its own."""
    ffi, lib = load()
    dims, fmt = _format_args(lib, num_experts, hidden, intermediate, format, block_k)
    out = ffi.new("kt_experts **")
    if memory is None:
        check(lib, ffi, lib.kt_experts_create(out, *dims, *fmt), "kt_experts_create")
    else:
        check_tensor(memory, "memory")
        if memory.dtype != torch.uint8 or not memory.is_cpu or not memory.is_contiguous():
            raise TypeError(f"memory must be a contiguous uint8 CPU tensor, got {memory.dtype} on {memory.device}")
        status = lib.kt_experts_create_in(out, *dims, *fmt, ffi.cast("void *", memory.data_ptr()), memory.numel(),
                                          int(bool(filled)))
        check(lib, ffi, status, "kt_experts_create_in")
    address = int(ffi.cast("uintptr_t", out[0]))
    _HANDLE_DIMS[address] = dims

    def destroy(handle, registry=_HANDLE_DIMS, destroy_experts=lib.kt_experts_destroy):   # bound now: may run at exit
        registry.pop(address, None)
        destroy_experts(handle)

    return ffi.gc(out[0], destroy)


def handle_dims(handle, num_experts=None, hidden=None, intermediate=None) -> tuple[int, int, int]:
    """``(E, H, I)`` of a live handle of `experts_create`, after checking the sizes given with it (None: any)."""
    ffi, _ = load()
    if not isinstance(handle, ffi.CData) or ffi.typeof(handle) is not ffi.typeof("kt_experts *"):
        raise TypeError(f"the engine handle must be a kt_experts * from experts_create, got {handle!r}")
    dims = _HANDLE_DIMS.get(int(ffi.cast("uintptr_t", handle)))
    if dims is None:
        raise ValueError("the engine handle is not a live one from experts_create (NULL, destroyed or foreign)")
    given = tuple(d if g is None else g for d, g in zip(dims, (num_experts, hidden, intermediate)))
    if given != dims:
        raise ValueError(f"sizes (E, H, I) = {given} do not match the engine's {dims}")
    return dims


def experts_load(handle, expert: int, gate_up: torch.Tensor, down: torch.Tensor, hidden: int, intermediate: int):
    """Packs one expert: ``gate_up [2I, H]`` and ``down [H, I]`` BF16 with unit column stride."""
    ffi, lib = load()
    handle_dims(handle, None, hidden, intermediate)
    expert = _as_int(expert, "expert")
    for t, name, shape in ((gate_up, "gate_up", (2 * intermediate, hidden)), (down, "down", (hidden, intermediate))):
        check_tensor(t, name)
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} of expert {expert} must be a 2-D tensor with unit column stride, got shape "
                             f"{list(t.shape)} strides {t.stride()}; pass a .contiguous() copy")
        as_ptr(t, dtype=torch.bfloat16, shape=shape, name=name, contiguous=False,
               dims="[2I, H]" if name == "gate_up" else "[H, I]")
    status = lib.kt_experts_load(handle, expert, ffi.cast("uint16_t *", gate_up.data_ptr()), gate_up.stride(0),
                                 ffi.cast("uint16_t *", down.data_ptr()), down.stride(0))
    check(lib, ffi, status, "kt_experts_load")


def experts_load_8bit(handle, expert: int, gate_up, down, hidden: int, intermediate: int, block_k: int) -> None:
    """Packs one expert of an 8-bit engine from two `QuantizedWeight`s (``codes`` float8_e4m3fn or int8
    with unit column stride, ``scales [N, ceil(K / block_k)]`` float32 contiguous)."""
    ffi, lib = load()
    handle_dims(handle, None, hidden, intermediate)
    expert = _as_int(expert, "expert")
    args = []
    for q, name, (N, K) in ((gate_up, "gate_up", (2 * intermediate, hidden)), (down, "down", (hidden, intermediate))):
        check_tensor(q.codes, f"{name} codes")
        if q.codes.dim() != 2 or q.codes.stride(1) != 1:
            raise ValueError(f"{name} codes of expert {expert} must be a 2-D tensor with unit column stride, got "
                             f"shape {list(q.codes.shape)} strides {q.codes.stride()}; pass a .contiguous() copy")
        if q.block_k != block_k:
            raise ValueError(f"{name} of expert {expert} has scales per {q.block_k or 'row'} values; this engine keeps "
                             f"one per {block_k or 'row'}")
        if q.codes.dtype not in (torch.float8_e4m3fn, torch.int8):
            raise TypeError(f"{name} codes must be float8_e4m3fn or int8, got {q.codes.dtype}")
        codes = as_ptr(q.codes, dtype=q.codes.dtype, shape=(N, K), name=f"{name} codes", contiguous=False)
        scales = as_ptr(q.scales, dtype=torch.float32, shape=(N, scale_blocks(K, block_k)), name=f"{name} scales")
        args += [codes, q.codes.stride(0), scales]
    check(lib, ffi, lib.kt_experts_load_8bit(handle, expert, *args), "kt_experts_load_8bit")


def experts_set_activation(handle, activation: str, alpha: float, limit: float) -> None:
    """``activation`` is a name of ``constants("ACT")``: ``"silu"`` or ``"clamped_swiglu"``."""
    ffi, lib = load()
    handle_dims(handle)
    kinds = constants("ACT")
    if not isinstance(activation, str) or activation not in kinds:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(kinds)}")
    check(lib, ffi, lib.kt_experts_set_activation(handle, kinds[activation], float(alpha), float(limit)),
          "kt_experts_set_activation")


def experts_load_bias(handle, expert: int, gate_up_bias: torch.Tensor, down_bias: torch.Tensor, hidden: int,
                      intermediate: int) -> None:
    """Frozen FP32 biases of one expert: ``gate_up_bias [2I]`` (gate then up), ``down_bias [H]``."""
    ffi, lib = load()
    handle_dims(handle, None, hidden, intermediate)
    status = lib.kt_experts_load_bias(
        handle, _as_int(expert, "expert"),
        as_ptr(gate_up_bias, dtype=torch.float32, shape=(2 * intermediate,), name="gate_up_bias", dims="[2I]"),
        as_ptr(down_bias, dtype=torch.float32, shape=(hidden,), name="down_bias", dims="[H]"))
    check(lib, ffi, status, "kt_experts_load_bias")


def experts_unpack(handle, expert: int, hidden: int, intermediate: int) -> tuple[torch.Tensor, torch.Tensor]:
    ffi, lib = load()
    handle_dims(handle, None, hidden, intermediate)
    gate_up = torch.empty(2 * intermediate, hidden, dtype=torch.bfloat16)
    down = torch.empty(hidden, intermediate, dtype=torch.bfloat16)
    status = lib.kt_experts_unpack(handle, _as_int(expert, "expert"),
                                   as_ptr(gate_up, dtype=torch.bfloat16, shape=gate_up.shape, name="gate_up"),
                                   as_ptr(down, dtype=torch.bfloat16, shape=down.shape, name="down"))
    check(lib, ffi, status, "kt_experts_unpack")
    return gate_up, down


def experts_packed_bytes(handle) -> int:
    _, lib = load()
    handle_dims(handle)
    return int(lib.kt_experts_packed_bytes(handle))


def _routing_descriptor(ids: torch.Tensor, weights: torch.Tensor, keep: dict):
    """``kt_routing *`` of ``ids [T, k]`` (int64 | int32) and ``weights [T, k]`` (float32 | bfloat16)."""
    ffi, lib = load()
    check_tensor(ids, "top_k_index")
    check_tensor(weights, "top_k_weights")
    if ids.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k] (k expert ids for each of T tokens), got shape {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64 or int32, got {ids.dtype}")
    if weights.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"top_k_weights must be float32 or bfloat16, got {weights.dtype}")
    if weights.shape != ids.shape:
        which = "" if weights.dim() != 2 else (
            f": T (tokens) {ids.shape[0]} vs {weights.shape[0]}" if weights.shape[0] != ids.shape[0]
            else f": k (experts per token) {ids.shape[1]} vs {weights.shape[1]}")
        raise ValueError(f"top_k_weights must be [T, k] = {list(ids.shape)} like top_k_index, got "
                         f"{list(weights.shape)}{which}")
    r = ffi.new("kt_routing *")
    r.ids = as_ptr(ids, dtype=ids.dtype, shape=ids.shape, name="top_k_index")
    r.ids_dtype = getattr(lib, DTYPE_CONSTANTS[ids.dtype])
    r.weights = as_ptr(weights, dtype=weights.dtype, shape=ids.shape, name="top_k_weights")
    r.weights_dtype = getattr(lib, DTYPE_CONSTANTS[weights.dtype])
    r.tokens, r.top_k = ids.shape
    keep.update({"top_k_index": ids, "top_k_weights": weights})
    return r


def _lora(lora, num_experts: int, out_features: int, in_features: int, name: str, keep: dict):
    """``kt_lora *`` for an object with ``A [E, r, in]``, ``B [E, out, r]`` (distinct elements), ``scale``."""
    ffi, _ = load()
    if lora is None:
        return ffi.NULL
    A, B = getattr(lora, "A", None), getattr(lora, "B", None)
    check_tensor(A, f"{name} LoRA A")
    check_tensor(B, f"{name} LoRA B")
    if A.dim() != 3 or A.shape[1] < 1:
        raise ValueError(f"{name} LoRA A must have shape [E, r, in] = [{num_experts}, r, {in_features}] with r >= 1, "
                         f"got {list(A.shape)}; pass lora_{name}=None for no LoRA")
    scale = float(lora.scale)
    if not math.isfinite(scale):
        raise ValueError(f"{name} LoRA scale must be finite, got {scale}")
    l = ffi.new("kt_lora *")
    l.rank, l.scale = A.shape[1], scale
    l.A = as_ptr(A, dtype=torch.float32, shape=(num_experts, l.rank, in_features), name=f"{name} LoRA A",
                 dims="[E, r, in]")
    # B is read, and dB written, with B's strides: its elements must be distinct (as_ptr).
    l.B = as_ptr(B, dtype=torch.float32, shape=(num_experts, out_features, l.rank), name=f"{name} LoRA B",
                 contiguous=False, dims="[E, out, r]")
    l.B_stride_e, l.B_stride_out, l.B_stride_rank = B.stride()
    keep.update({f"{name} LoRA A": A, f"{name} LoRA B": B})
    return l


def _call_inputs(handle, dims, x, ids, weights, lora_gate_up, lora_down, keep: dict):
    """``(E, H, I), T, k`` and the hidden-state, routing and LoRA pointers forward and backward both pass."""
    if not isinstance(dims, (tuple, list)) or len(dims) != 3:
        raise ValueError(f"dims must be the engine's (E, H, I), got {dims!r}")
    E, H, I = handle_dims(handle, *dims)
    routing = _routing_descriptor(ids, weights, keep)
    T, k = ids.shape
    x_ptr = as_ptr(x, dtype=torch.bfloat16, shape=(T, H), name="hidden_states", dims="[T, H]")
    keep["hidden_states"] = x
    return (E, H, I), T, k, x_ptr, routing, _lora(lora_gate_up, E, 2 * I, H, "gate_up", keep), \
        _lora(lora_down, E, H, I, "down", keep)


def _rank(lora) -> int:
    return 0 if lora is None else lora.A.shape[1]


def _opt_ptr(t, dtype, shape, name):
    return load()[0].NULL if t is None else as_ptr(t, dtype=dtype, shape=shape, name=name)


def _saved_activations(saved, rows: int, two_i: int, lora_gate_up, lora_down, keep: dict):
    """``kt_saved_activations *`` of ``saved`` = (gate_up [T*k, 2I] bf16 | None, lora_gate_up [T*k, r] | None,
    lora_down [T*k, r] | None), holding LoRA rows exactly for the given LoRAs."""
    ffi, _ = load()
    if not isinstance(saved, (tuple, list)) or len(saved) != 3:
        raise TypeError("saved must be the (gate_up, lora_gate_up, lora_down) a forward returned")
    for t, lora, name in ((saved[1], lora_gate_up, "gate_up"), (saved[2], lora_down, "down")):
        if saved[0] is not None and (t is None) != (lora is None):   # a forward that saved nothing: C says so
            raise ValueError(f"the saved activations {'lack' if t is None else 'hold'} {name} LoRA rows but "
                             f"lora_{name} is {'None' if lora is None else 'given'}; pass the LoRAs of the forward")
    s = ffi.new("kt_saved_activations *")
    s.gate_up = _opt_ptr(saved[0], torch.bfloat16, (rows, two_i), "saved gate_up")
    s.lora_gate_up = _opt_ptr(saved[1], torch.float32, (rows, _rank(lora_gate_up)), "saved gate_up LoRA")
    s.lora_down = _opt_ptr(saved[2], torch.float32, (rows, _rank(lora_down)), "saved down LoRA")
    keep.update(zip(("saved gate_up", "saved gate_up LoRA", "saved down LoRA"), saved))
    return s


def experts_forward(handle, dims, x, ids, weights, lora_gate_up, lora_down, save: bool, empty=host_empty):
    """``(y [T, H] BF16, saved)``; ``saved`` = (gate_up [T*k, 2I] BF16, lora_gu [T*k, r] | None, lora_d | None).

    ``empty(shape, dtype)`` allocates ``y`` (a contiguous CPU tensor; checked before the call).
    ``saved`` is in the engine's host memory: huge pages, which its scattered per-route accesses
    in backward need.
    """
    ffi, lib = load()
    keep: dict = {}
    (E, H, I), T, k, x_ptr, routing, lgu, ld = _call_inputs(handle, dims, x, ids, weights, lora_gate_up, lora_down,
                                                            keep)
    y = empty((T, H), torch.bfloat16)
    y_ptr = as_ptr(y, dtype=torch.bfloat16, shape=(T, H), name="y")
    check_disjoint({"y": y}, keep)
    saved = (host_empty((T * k, 2 * I), torch.bfloat16) if save else None,
             host_empty((T * k, _rank(lora_gate_up))) if save and lora_gate_up is not None else None,
             host_empty((T * k, _rank(lora_down))) if save and lora_down is not None else None)
    saved_ptrs = _saved_activations(saved, T * k, 2 * I, lora_gate_up, lora_down, keep)
    status = lib.kt_experts_forward(handle, y_ptr, saved_ptrs, x_ptr, routing, lgu, ld)
    check(lib, ffi, status, "kt_experts_forward")
    return y, saved


def _lora_grad(dst, grads, lora, name: str, outputs: dict) -> None:
    """Fills the ``kt_lora_grad`` ``dst`` from ``grads`` = (dA | None, dB | None) shaped like ``lora``'s A and B."""
    if grads is None:
        return
    if lora is None:
        raise ValueError(f"{name} LoRA gradients were asked for without a {name} LoRA")
    dA, dB = grads
    if dA is not None:
        dst.dA = as_ptr(dA, dtype=torch.float32, shape=lora.A.shape, name=f"{name} dA")
    if dB is not None:
        check_tensor(dB, f"{name} dB")
        if dB.shape != lora.B.shape or dB.stride() != lora.B.stride():
            raise ValueError(f"{name} dB must have the shape and strides of B, {list(lora.B.shape)} "
                             f"{lora.B.stride()}, got {list(dB.shape)} {dB.stride()}")
        dst.dB = as_ptr(dB, dtype=torch.float32, shape=lora.B.shape, name=f"{name} dB", contiguous=False)
    outputs.update({f"{name} dA": dA, f"{name} dB": dB})


def experts_backward(handle, dims, dy, x, ids, weights, saved, lora_gate_up, lora_down, *,
                     need_dx: bool = True, need_dw: bool = True, grads_gate_up=None, grads_down=None,
                     empty=host_empty):
    """``(dx [T, H] BF16 | None, dw [T, k] FP32 | None)``, allocated by ``empty(shape, dtype)``; the LoRA
    gradients are written into ``grads_*`` = (dA, dB) (either may be None) before returning."""
    ffi, lib = load()
    keep: dict = {}
    (E, H, I), T, k, x_ptr, routing, lgu, ld = _call_inputs(handle, dims, x, ids, weights, lora_gate_up, lora_down,
                                                            keep)
    saved_ptrs = _saved_activations(saved, T * k, 2 * I, lora_gate_up, lora_down, keep)
    dy_ptr = as_ptr(dy, dtype=torch.bfloat16, shape=(T, H), name="grad_output", dims="[T, H]")
    keep["grad_output"] = dy
    grads, outputs = ffi.new("kt_gradients *"), {}
    _lora_grad(grads.lora_gate_up, grads_gate_up, lora_gate_up, "gate_up", outputs)
    _lora_grad(grads.lora_down, grads_down, lora_down, "down", outputs)
    outputs["dx"] = dx = empty((T, H), torch.bfloat16) if need_dx else None
    outputs["dw"] = dw = empty((T, k), torch.float32) if need_dw else None
    grads.dx = _opt_ptr(dx, torch.bfloat16, (T, H), "dx")
    grads.dw = _opt_ptr(dw, torch.float32, (T, k), "dw")
    check_disjoint(outputs, keep)
    status = lib.kt_experts_backward(handle, grads, dy_ptr, x_ptr, routing, saved_ptrs, lgu, ld)
    check(lib, ffi, status, "kt_experts_backward")
    return dx, dw


def profile_read(reset: bool = False) -> dict[str, float]:
    """Milliseconds per engine stage since the last reset (the KT_STAGE_* of kt_trl.h, lower-case)."""
    ffi, lib = load()
    stages = constants("STAGE")
    buf = ffi.new("double[]", lib.KT_STAGE_COUNT)
    lib.kt_profile_read(buf, int(reset))
    return {name: round(buf[code], 3) for name, code in stages.items()}
