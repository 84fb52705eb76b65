"""Boundary fuzz targets below ExpertEngine: the ops wrappers and the raw `lib.kt_*` calls.

`fuzz_ops` gives the wrappers what ExpertEngine would never pass: sizes that do not match the
handle, foreign handles, junk in place of ints, tensors and LoRA objects. Each call must be
refused with ValueError, TypeError or KTNativeError.

`fuzz_lib` calls the C ABI straight, with buffers sized for the sizes it declares and exactly one
argument the library must refuse: a NULL or misaligned pointer, a size out of range, strides that
overflow or overlap, an unknown dtype, activation or ISA code. The status must not be KT_OK and
the message must say something. (A non-NULL garbage handle, or a buffer smaller than its declared
size, cannot be detected in C and is not drawn.)
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kt_trl._native import KTNativeError, ops
from kt_trl._native.ffi import load
from kt_trl.engine import ExpertEngine

from .fuzz_inputs import BAD_INTS, NOT_TENSORS, Draw

REFUSALS = (ValueError, TypeError, KTNativeError)
_ENGINE: dict = {}


def small_engine() -> ExpertEngine:
    """One engine (E, H, I) = (3, 16, 8) for every raw call: the targets never change its weights."""
    if "engine" not in _ENGINE:
        _ENGINE["engine"] = ExpertEngine(torch.randn(3, 16, 16), torch.randn(3, 16, 8))
    return _ENGINE["engine"]


def refused(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except REFUSALS:
        return
    raise AssertionError(f"{getattr(fn, '__name__', fn)} accepted {args} {kwargs}")


def fuzz_ops(draw: Draw) -> None:
    engine = small_engine()
    ffi, _ = load()
    E, H, I = engine.dims
    h = engine._handle
    bad_int = draw.pick(BAD_INTS + [2.5, "3", None])
    handle = draw.pick([None, ffi.NULL, 64, ffi.cast("kt_experts *", 64), ffi.cast("void *", 0), "handle"])
    choice = draw.int(0, 11)
    if choice == 0:
        refused(ops.experts_create, *[draw.pick([bad_int, 4]) for _ in range(2)], bad_int)
    elif choice == 1:
        refused(ops.experts_packed_bytes, handle)
    elif choice == 2:   # sizes that are not the handle's: C would run past the buffers
        refused(ops.experts_unpack, h, 0, H + draw.int(1, 64), I)
    elif choice == 3:
        refused(ops.experts_load, h, draw.pick([E, -1, 1 << 63, -(1 << 63) - 1, 2.5, "0", None]),
                torch.zeros(2 * I, H, dtype=torch.bfloat16),
                torch.zeros(H, I, dtype=torch.bfloat16), H, I)
    elif choice == 4:
        gu = draw.pick([torch.zeros(2 * I, H + 1, dtype=torch.bfloat16), torch.zeros(2 * I, H).bfloat16().t(),
                        torch.zeros(()), *NOT_TENSORS])
        refused(ops.experts_load, h, 0, gu, torch.zeros(H, I, dtype=torch.bfloat16), H, I)
    elif choice == 5:
        refused(ops.experts_set_activation, draw.pick([h, handle]), draw.pick(["gelu", 1, None, "silu"]),
                draw.pick([float("nan"), 1.0, "a"]), draw.pick([-1.0, 0.0, float("inf")]))
    elif choice == 6:
        refused(ops.host_empty, draw.pick([(-1,), (bad_int,), "ab", (2, 2)]), draw.pick([torch.float64, torch.int8]))
    elif choice == 7:
        refused(ops.runtime_configure, draw.pick(["neon", None, 3]), draw.int(1, 2))
    elif choice == 8:   # forward with dims that are not the handle's, or a handle that is not one
        dims = draw.pick([(E + 1, H, I), (E, H, I + 1), (E, H)])
        x, ids, w = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        refused(ops.experts_forward, draw.pick([h, handle]) if dims != (E, H) else h, dims, x, ids, w, None, None,
                True)
    elif choice == 9:   # LoRA objects with junk inside
        lora = SimpleNamespace(A=draw.pick([torch.zeros(E, 2, H), torch.zeros(E, 2), *NOT_TENSORS]),
                               B=draw.pick([torch.zeros(E, 2 * I, 2), torch.zeros(2 * I, 2).expand(E, -1, -1)]),
                               scale=draw.pick([float("nan"), "x", None, object()]))
        x, ids, w = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        refused(ops.experts_forward, h, engine.dims, x, ids, w, lora, None, True)
    elif choice == 10:  # saved activations that are not what a forward returned
        x, ids, w = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        saved = draw.pick([None, (), (torch.zeros(2, 2 * I, dtype=torch.bfloat16),), (torch.zeros(3, 2 * I),) * 3,
                           (torch.zeros(2, 2 * I, dtype=torch.bfloat16), None, None, None)])
        refused(ops.experts_backward, h, engine.dims, x, x, ids, w, saved, None, None)
    else:   # LoRA gradients asked for without a LoRA, or with B's shape and not its strides
        x, ids, w = torch.zeros(2, H, dtype=torch.bfloat16), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
        _, saved = engine.forward(x, ids, w)
        refused(ops.experts_backward, h, engine.dims, x, x, ids, w, saved, None, None,
                grads_gate_up=(torch.zeros(E, 2, H), None))


def _ptr(ffi, ctype: str, t: torch.Tensor, shift: int = 0):
    return ffi.cast(ctype, t.data_ptr() + shift)


def fuzz_lib(draw: Draw) -> None:
    engine = small_engine()
    ffi, lib = load()
    E, H, I = engine.dims
    h = engine._handle
    T, k, r = 2, 1, 2
    x, dy = torch.zeros(T, H, dtype=torch.bfloat16), torch.zeros(T, H, dtype=torch.bfloat16)
    y, dx = torch.zeros(T, H, dtype=torch.bfloat16), torch.zeros(T, H, dtype=torch.bfloat16)
    ids, w = torch.tensor([[0], [2]]), torch.ones(T, k)
    A, B = torch.zeros(E, r, H), torch.zeros(E, 2 * I, r)
    dA, dB = torch.zeros(E, r, H), torch.zeros(E, 2 * I, r)
    saved_gu, saved_l = torch.zeros(T * k, 2 * I, dtype=torch.bfloat16), torch.zeros(T * k, r)
    routing = ffi.new("kt_routing *")
    routing.ids, routing.ids_dtype = _ptr(ffi, "int64_t *", ids), lib.KT_DTYPE_INT64
    routing.weights, routing.weights_dtype = _ptr(ffi, "float *", w), lib.KT_DTYPE_FP32
    routing.tokens, routing.top_k = T, k
    lora = ffi.new("kt_lora *")
    lora.A, lora.B, lora.rank, lora.scale = _ptr(ffi, "float *", A), _ptr(ffi, "float *", B), r, 1.0
    lora.B_stride_e, lora.B_stride_out, lora.B_stride_rank = B.stride()
    saved = ffi.new("kt_saved_activations *")
    saved.gate_up, saved.lora_gate_up = _ptr(ffi, "uint16_t *", saved_gu), _ptr(ffi, "float *", saved_l)
    grads = ffi.new("kt_gradients *")
    grads.dx, grads.lora_gate_up.dA, grads.lora_gate_up.dB = _ptr(ffi, "uint16_t *", dx), _ptr(ffi, "float *", dA), \
        _ptr(ffi, "float *", dB)
    odd = draw.int(1, 3)
    breakers = {   # each sets exactly one argument the library must refuse
        "routing NULL": lambda: setattr(call, "routing", ffi.NULL),
        "tokens < 0": lambda: setattr(routing, "tokens", -draw.int(1, 1 << 40)),
        "top_k out of range": lambda: setattr(routing, "top_k", draw.pick([0, -1, 65, 1 << 40])),
        "ids dtype": lambda: setattr(routing, "ids_dtype", draw.pick([-1, 7, lib.KT_DTYPE_FP32])),
        "weights dtype": lambda: setattr(routing, "weights_dtype", draw.pick([-1, 9, lib.KT_DTYPE_INT64])),
        "ids NULL": lambda: setattr(routing, "ids", ffi.NULL),
        "ids misaligned": lambda: setattr(routing, "ids", _ptr(ffi, "int64_t *", ids, draw.int(1, 7))),
        "weights misaligned": lambda: setattr(routing, "weights", _ptr(ffi, "float *", w, odd)),
        "x NULL": lambda: setattr(call, "x", ffi.NULL),
        "x misaligned": lambda: setattr(call, "x", _ptr(ffi, "uint16_t *", x, 1)),
        "rank out of range": lambda: setattr(lora, "rank", draw.pick([-1, 4097, 1 << 40])),
        "A NULL": lambda: setattr(lora, "A", ffi.NULL),
        "B misaligned": lambda: setattr(lora, "B", _ptr(ffi, "float *", B, odd)),
        "B stride < 0": lambda: setattr(lora, draw.pick(["B_stride_e", "B_stride_out", "B_stride_rank"]), -1),
        "B stride overflows": lambda: setattr(lora, "B_stride_out", draw.pick([1 << 62, (1 << 63) - 1])),
        "handle NULL": lambda: setattr(call, "handle", ffi.NULL),
    }
    backward_only = {
        "grads NULL": lambda: setattr(call, "grads", ffi.NULL),
        "dy NULL": lambda: setattr(call, "dy", ffi.NULL),
        "dy misaligned": lambda: setattr(call, "dy", _ptr(ffi, "uint16_t *", dy, 1)),
        "saved gate_up NULL": lambda: setattr(saved, "gate_up", ffi.NULL),
        "saved LoRA NULL with dB": lambda: setattr(saved, "lora_gate_up", ffi.NULL),
        "dB misaligned": lambda: setattr(grads.lora_gate_up, "dB", _ptr(ffi, "float *", dB, odd)),
        "dB through overlapping B": lambda: setattr(lora, "B_stride_e", 0),
        "dA of a LoRA not given": lambda: setattr(grads.lora_down, "dA", _ptr(ffi, "float *", dA)),
    }
    backward = draw.int(0, 1) == 1
    name = draw.pick(["nothing"] + sorted({**breakers, **(backward_only if backward else {})}))
    call = SimpleNamespace(handle=h, routing=routing, x=_ptr(ffi, "uint16_t *", x), grads=grads,
                           dy=_ptr(ffi, "uint16_t *", dy))
    {"nothing": lambda: None, **breakers, **backward_only}[name]()
    if backward:
        status = lib.kt_experts_backward(call.handle, call.grads, call.dy, call.x, call.routing, saved, lora, ffi.NULL)
    else:
        status = lib.kt_experts_forward(call.handle, _ptr(ffi, "uint16_t *", y), ffi.NULL, call.x, call.routing, lora,
                                        ffi.NULL)
    message = ffi.string(lib.kt_last_error())
    if name == "nothing":   # the baseline every breaker starts from is a valid call
        assert status == lib.KT_OK, f"the valid baseline was refused: {message}"
    else:
        assert status != lib.KT_OK and message, f"the library accepted {name} ({'backward' if backward else 'forward'})"
    if draw.odds(4):
        fuzz_lib_misc(draw, ffi, lib, h)


def fuzz_lib_misc(draw: Draw, ffi, lib, h) -> None:
    """The other entry points, each with one argument the library must refuse (or ignore)."""
    buf = torch.zeros(64, 16, dtype=torch.bfloat16)
    p, odd = _ptr(ffi, "uint16_t *", buf), _ptr(ffi, "uint16_t *", buf, 1)
    out = ffi.new("kt_experts **")
    block = ffi.new("void **")
    calls = [
        lambda: lib.kt_experts_create(out, draw.pick([0, -1, 65537]), 16, 16, 0, 0),
        lambda: lib.kt_experts_create(out, 2, draw.pick([0, (1 << 20) + 1]), 16, 0, 0),
        lambda: lib.kt_experts_create(ffi.NULL, 2, 16, 16, 0, 0),
        lambda: lib.kt_experts_create(out, 2, 16, 16, draw.pick([-1, 3, 1 << 30]), 0),
        lambda: lib.kt_experts_create(out, 2, 16, 16, draw.pick([0, 1, 2]), draw.pick([-16, 8, 17, 1 << 21])),
        lambda: lib.kt_experts_weight_bytes(draw.pick([ffi.NULL, ffi.new("int64_t *")]), 0, 16, 16, 0, 0),
        lambda: lib.kt_experts_create_in(out, 2, 16, 16, 0, 0, draw.pick([ffi.NULL, odd, p]), draw.pick([-1, 0, 64]),
                                         draw.int(0, 1)),
        lambda: lib.kt_experts_load_8bit(h, 0, ffi.cast("uint8_t *", p), 16, ffi.cast("float *", p),
                                         ffi.cast("uint8_t *", p), 8, ffi.cast("float *", p)),   # a BF16 engine
        lambda: lib.kt_experts_load(h, draw.pick([-1, 3, 1 << 40]), p, 16, p, 8),
        lambda: lib.kt_experts_load(h, 0, draw.pick([ffi.NULL, odd]), 16, p, 8),
        lambda: lib.kt_experts_load(h, 0, p, draw.pick([15, -1, 1 << 41]), p, 8),
        lambda: lib.kt_experts_load(ffi.NULL, 0, p, 16, p, 8),
        lambda: lib.kt_experts_unpack(h, 0, draw.pick([ffi.NULL, odd]), p),
        lambda: lib.kt_experts_load_bias(h, 0, ffi.cast("float *", buf.data_ptr() + 2), ffi.cast("float *", p)),
        lambda: lib.kt_experts_set_activation(h, draw.pick([-1, 2, 99]), 1.0, 7.0),
        lambda: lib.kt_experts_set_activation(h, 0, float("nan"), draw.pick([0.0, -1.0, float("inf")])),
        lambda: lib.kt_host_alloc(draw.pick([ffi.NULL, block]), draw.pick([-1, (1 << 46) + 1])),
        lambda: lib.kt_runtime_configure(draw.pick([-2, 4, 1 << 30]), 1),
        lambda: lib.kt_runtime_configure(-1, draw.pick([-1, 4097, -(1 << 31)])),
    ]
    status = draw.pick(calls)()
    assert status != lib.KT_OK and ffi.string(lib.kt_last_error()), "the library accepted a bad argument"
    # Entry points without a status: they must return, not crash.
    lib.kt_host_free(draw.pick([ffi.NULL, ffi.cast("void *", 64), odd]))
    lib.kt_profile_read(ffi.NULL, draw.int(0, 1))
    assert lib.kt_experts_packed_bytes(ffi.NULL) == 0 and lib.kt_isa_available(draw.pick([-5, 4, 1 << 30])) == 0
    lib.kt_experts_destroy(ffi.NULL)
