"""Typed wrappers of the C ABI: the only module that casts tensors to pointers.

Every wrapper validates device, dtype, shape and layout before the cast, keeps the tensors alive
for the call, and turns a failing status into an exception (errors.check). Enum values are the
library's ``KT_*`` constants, never copies.
"""

from __future__ import annotations

import functools

import torch

from . import isa as isa_mod
from .errors import check
from .ffi import load

_CTYPES = {torch.bfloat16: "uint16_t *", torch.float32: "float *", torch.int64: "int64_t *", torch.int32: "int32_t *"}
# The KT_DTYPE_* constant of each dtype the engine reads (routing ids and weights).
DTYPE_CONSTANTS = {torch.float32: "KT_DTYPE_FP32", torch.bfloat16: "KT_DTYPE_BF16", torch.int32: "KT_DTYPE_INT32",
                   torch.int64: "KT_DTYPE_INT64"}


def as_ptr(t: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...], name: str, contiguous: bool = True):
    """``ffi.cast`` of ``t`` after checking device, dtype, shape and contiguity."""
    ffi, _ = load()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return ffi.cast(_CTYPES[dtype], t.data_ptr())


_ELEM_SIZE = {torch.bfloat16: 2, torch.float32: 4}


def host_empty(shape, dtype: torch.dtype = torch.float32, stride=None) -> torch.Tensor:
    """An uninitialised CPU tensor in the engine's cached host memory (no page faults on reuse).

    The memory returns to the cache when the tensor (and every view of it) is freed.
    """
    ffi, lib = load()
    shape = tuple(int(d) for d in shape)
    stride = tuple(stride) if stride is not None else None
    if stride is None:
        numel = 1
        for d in shape:
            numel *= d
    else:   # storage span of a strided layout
        numel = 1 + sum((d - 1) * st for d, st in zip(shape, stride)) if all(shape) else 0
    nbytes = numel * _ELEM_SIZE[dtype]
    out = ffi.new("void **")
    check(lib, ffi, lib.kt_host_alloc(out, nbytes), "kt_host_alloc")
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
    check(lib, ffi, lib.kt_runtime_configure(constants("ISA")[isa], threads), "configure")


def isa_available(name: str) -> bool:
    _, lib = _runtime_lib()
    return bool(lib.kt_isa_available(constants("ISA")[name]))


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


def experts_create(num_experts: int, hidden: int, intermediate: int):
    """A ``kt_experts`` handle, destroyed when garbage-collected."""
    ffi, lib = load()
    out = ffi.new("kt_experts **")
    check(lib, ffi, lib.kt_experts_create(out, num_experts, hidden, intermediate), "kt_experts_create")
    return ffi.gc(out[0], lib.kt_experts_destroy)


def experts_load(handle, expert: int, gate_up: torch.Tensor, down: torch.Tensor, hidden: int, intermediate: int):
    """Packs one expert: ``gate_up [2I, H]`` and ``down [H, I]`` BF16 with unit column stride."""
    ffi, lib = load()
    for t, name, shape in ((gate_up, "gate_up", (2 * intermediate, hidden)), (down, "down", (hidden, intermediate))):
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} of expert {expert} must be a 2-D tensor with unit column stride")
        as_ptr(t, dtype=torch.bfloat16, shape=shape, name=name, contiguous=False)
    status = lib.kt_experts_load(handle, expert, ffi.cast("uint16_t *", gate_up.data_ptr()), gate_up.stride(0),
                                 ffi.cast("uint16_t *", down.data_ptr()), down.stride(0))
    check(lib, ffi, status, "kt_experts_load")


def experts_set_activation(handle, activation: str, alpha: float, limit: float) -> None:
    """``activation`` is a name of ``constants("ACT")``: ``"silu"`` or ``"clamped_swiglu"``."""
    ffi, lib = load()
    kinds = constants("ACT")
    if activation not in kinds:
        raise ValueError(f"unknown activation {activation!r}; use one of {sorted(kinds)}")
    check(lib, ffi, lib.kt_experts_set_activation(handle, kinds[activation], alpha, limit),
          "kt_experts_set_activation")


def experts_load_bias(handle, expert: int, gate_up_bias: torch.Tensor, down_bias: torch.Tensor, hidden: int,
                      intermediate: int) -> None:
    """Frozen FP32 biases of one expert: ``gate_up_bias [2I]`` (gate then up), ``down_bias [H]``."""
    ffi, lib = load()
    status = lib.kt_experts_load_bias(
        handle, expert, as_ptr(gate_up_bias, dtype=torch.float32, shape=(2 * intermediate,), name="gate_up_bias"),
        as_ptr(down_bias, dtype=torch.float32, shape=(hidden,), name="down_bias"))
    check(lib, ffi, status, "kt_experts_load_bias")


def experts_unpack(handle, expert: int, hidden: int, intermediate: int) -> tuple[torch.Tensor, torch.Tensor]:
    ffi, lib = load()
    gate_up = torch.empty(2 * intermediate, hidden, dtype=torch.bfloat16)
    down = torch.empty(hidden, intermediate, dtype=torch.bfloat16)
    status = lib.kt_experts_unpack(handle, expert,
                                   as_ptr(gate_up, dtype=torch.bfloat16, shape=gate_up.shape, name="gate_up"),
                                   as_ptr(down, dtype=torch.bfloat16, shape=down.shape, name="down"))
    check(lib, ffi, status, "kt_experts_unpack")
    return gate_up, down


def experts_packed_bytes(handle) -> int:
    _, lib = load()
    return int(lib.kt_experts_packed_bytes(handle))


def _routing_descriptor(ids: torch.Tensor, weights: torch.Tensor, keep: list):
    """``kt_routing *`` of ``ids [T, k]`` (int64 | int32) and ``weights [T, k]`` (float32 | bfloat16)."""
    ffi, lib = load()
    if ids.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {list(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"top_k_index must be int64 or int32, got {ids.dtype}")
    if weights.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"top_k_weights must be float32 or bfloat16, got {weights.dtype}")
    r = ffi.new("kt_routing *")
    r.ids = as_ptr(ids, dtype=ids.dtype, shape=ids.shape, name="top_k_index")
    r.ids_dtype = getattr(lib, DTYPE_CONSTANTS[ids.dtype])
    r.weights = as_ptr(weights, dtype=weights.dtype, shape=ids.shape, name="top_k_weights")
    r.weights_dtype = getattr(lib, DTYPE_CONSTANTS[weights.dtype])
    r.tokens, r.top_k = ids.shape
    keep += [ids, weights]
    return r


def _lora(lora, num_experts: int, out_features: int, in_features: int, name: str, keep: list):
    """``kt_lora *`` for an object with ``A [E, r, in]``, ``B [E, out, r]`` (any strides), ``scale``."""
    ffi, _ = load()
    if lora is None:
        return ffi.NULL
    rank = lora.A.shape[1] if lora.A.dim() == 3 else -1
    l = ffi.new("kt_lora *")
    l.A = as_ptr(lora.A, dtype=torch.float32, shape=(num_experts, rank, in_features), name=f"{name} LoRA A")
    l.B = as_ptr(lora.B, dtype=torch.float32, shape=(num_experts, out_features, rank), name=f"{name} LoRA B",
                 contiguous=False)
    l.rank = rank
    l.B_stride_e, l.B_stride_out, l.B_stride_rank = lora.B.stride()
    l.scale = float(lora.scale)
    keep += [lora.A, lora.B]
    return l


def _call_inputs(dims, ids, weights, lora_gate_up, lora_down, keep: list):
    """The routing and LoRA descriptors that forward and backward both pass."""
    E, H, I = dims
    return (_routing_descriptor(ids, weights, keep), _lora(lora_gate_up, E, 2 * I, H, "gate_up", keep),
            _lora(lora_down, E, H, I, "down", keep))


def _rank(lora) -> int:
    return 0 if lora is None else lora.A.shape[1]


def _opt_ptr(t, dtype, shape, name):
    return load()[0].NULL if t is None else as_ptr(t, dtype=dtype, shape=shape, name=name)


def _saved_activations(saved, rows: int, two_i: int, lora_gate_up, lora_down, keep: list):
    """``kt_saved_activations *`` of ``saved`` = (gate_up [T*k, 2I] bf16 | None, lora_gate_up [T*k, r] | None,
    lora_down [T*k, r] | None)."""
    ffi, _ = load()
    gate_up, lgu, ld = saved
    s = ffi.new("kt_saved_activations *")
    s.gate_up = _opt_ptr(gate_up, torch.bfloat16, (rows, two_i), "saved gate_up")
    s.lora_gate_up = _opt_ptr(lgu, torch.float32, (rows, _rank(lora_gate_up)), "saved gate_up LoRA")
    s.lora_down = _opt_ptr(ld, torch.float32, (rows, _rank(lora_down)), "saved down LoRA")
    keep += [gate_up, lgu, ld]
    return s


def experts_forward(handle, dims, x, ids, weights, lora_gate_up, lora_down, save: bool, empty=host_empty):
    """``(y [T, H] BF16, saved)``; ``saved`` = (gate_up [T*k, 2I] BF16, lora_gu [T*k, r] | None, lora_d | None).

    ``empty(shape, dtype)`` allocates ``y`` (a contiguous CPU tensor; checked before the call).
    ``saved`` is in the engine's host memory: huge pages, which its scattered per-route accesses
    in backward need.
    """
    ffi, lib = load()
    E, H, I = dims
    T, k = ids.shape
    keep: list = []
    routing, lgu, ld = _call_inputs(dims, ids, weights, lora_gate_up, lora_down, keep)
    y = empty((T, H), torch.bfloat16)
    saved = (host_empty((T * k, 2 * I), torch.bfloat16) if save else None,
             host_empty((T * k, _rank(lora_gate_up))) if save and lora_gate_up is not None else None,
             host_empty((T * k, _rank(lora_down))) if save and lora_down is not None else None)
    status = lib.kt_experts_forward(
        handle, as_ptr(y, dtype=torch.bfloat16, shape=(T, H), name="y"),
        _saved_activations(saved, T * k, 2 * I, lora_gate_up, lora_down, keep),
        as_ptr(x, dtype=torch.bfloat16, shape=(T, H), name="hidden_states"), routing, lgu, ld)
    check(lib, ffi, status, "kt_experts_forward")
    return y, saved


def _lora_grad(dst, grads, lora, name: str, keep: list) -> None:
    """Fills the ``kt_lora_grad`` ``dst`` from ``grads`` = (dA | None, dB | None) shaped like ``lora``'s A and B."""
    if grads is None:
        return
    dA, dB = grads
    if dA is not None:
        dst.dA = as_ptr(dA, dtype=torch.float32, shape=lora.A.shape, name=f"{name} dA")
    if dB is not None:
        if dB.shape != lora.B.shape or dB.stride() != lora.B.stride():
            raise ValueError(f"{name} dB must have the shape and strides of B")
        dst.dB = as_ptr(dB, dtype=torch.float32, shape=lora.B.shape, name=f"{name} dB", contiguous=False)
    keep += [dA, dB]


def experts_backward(handle, dims, dy, x, ids, weights, saved, lora_gate_up, lora_down, *,
                     need_dx: bool = True, need_dw: bool = True, grads_gate_up=None, grads_down=None,
                     empty=host_empty):
    """``(dx [T, H] BF16 | None, dw [T, k] FP32 | None)``, allocated by ``empty(shape, dtype)``; the LoRA
    gradients are written into ``grads_*`` = (dA, dB) (either may be None) before returning."""
    ffi, lib = load()
    E, H, I = dims
    T, k = ids.shape
    keep: list = []
    routing, lgu, ld = _call_inputs(dims, ids, weights, lora_gate_up, lora_down, keep)
    dx = empty((T, H), torch.bfloat16) if need_dx else None
    dw = empty((T, k), torch.float32) if need_dw else None
    grads = ffi.new("kt_gradients *")
    grads.dx = _opt_ptr(dx, torch.bfloat16, (T, H), "dx")
    grads.dw = _opt_ptr(dw, torch.float32, (T, k), "dw")
    _lora_grad(grads.lora_gate_up, grads_gate_up, lora_gate_up, "gate_up", keep)
    _lora_grad(grads.lora_down, grads_down, lora_down, "down", keep)
    status = lib.kt_experts_backward(
        handle, grads, as_ptr(dy, dtype=torch.bfloat16, shape=(T, H), name="grad_output"),
        as_ptr(x, dtype=torch.bfloat16, shape=(T, H), name="hidden_states"), routing,
        _saved_activations(saved, T * k, 2 * I, lora_gate_up, lora_down, keep), lgu, ld)
    check(lib, ffi, status, "kt_experts_backward")
    return dx, dw


def profile_read(reset: bool = False) -> dict[str, float]:
    """Milliseconds per engine stage since the last reset (the KT_STAGE_* of kt_trl.h, lower-case)."""
    ffi, lib = load()
    stages = constants("STAGE")
    buf = ffi.new("double[]", lib.KT_STAGE_COUNT)
    lib.kt_profile_read(buf, int(reset))
    return {name: round(buf[code], 3) for name, code in stages.items()}
