"""The boundary never computes wrong: layouts it cannot write through are copied or refused, and
every refusal names what was wrong and what to pass instead (ExpertEngine, ops and the C ABI)."""

from __future__ import annotations

import pytest
import torch

from kt_trl._native import ops, pointers
from kt_trl._native.ffi import load
from kt_trl.engine import ExpertActivations, ExpertEngine, ExpertLoRA
from kt_trl.experts import routed_experts
from kt_trl.reference import routed_experts_reference

from .moe_case import REL_TOL, make_case, make_engine, rel_err

E, H, I, T, K, R = 4, 32, 16, 6, 2, 4


@pytest.fixture(scope="module")
def case():
    return make_case(E, H, I, T, K, seed=3)


@pytest.fixture(scope="module")
def engine(case):
    return make_engine(case)


def forward(engine, case, x=None, ids=None, w=None, **kw):
    return engine.forward(case.x if x is None else x, case.ids if ids is None else ids,
                          case.w if w is None else w, **kw)


# --- 1. views whose elements overlap --------------------------------------------------------------

def expanded_loras(seed=0):
    """Trainable LoRA factors of one expert, expanded to all E (zero stride on the expert dim)."""
    g = torch.Generator().manual_seed(seed)
    leaves = [(0.2 * torch.randn(1, R, H, generator=g)).requires_grad_(),
              (0.2 * torch.randn(1, 2 * I, R, generator=g)).requires_grad_(),
              (0.2 * torch.randn(1, R, I, generator=g)).requires_grad_(),
              (0.2 * torch.randn(1, H, R, generator=g)).requires_grad_()]
    return leaves


def test_expanded_lora_views_get_the_reference_gradient(case, engine):
    leaves = expanded_loras()
    views = [t.expand(E, -1, -1) for t in leaves]
    y = routed_experts(engine, case.x, case.ids, case.w, lora_gate_up=ExpertLoRA(views[0], views[1], 0.5),
                       lora_down=ExpertLoRA(views[2], views[3], 2.0))
    y.float().backward(case.dy.float())
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rv = [t.expand(E, -1, -1) for t in ref_leaves]
    ref = routed_experts_reference(case.x, case.ids, case.w, case.gate_up, case.down, lora_gate_up=(rv[0], rv[1], 0.5),
                                   lora_down=(rv[2], rv[3], 2.0))
    ref.backward(case.dy.double())
    assert rel_err(y.detach(), ref.detach()) <= REL_TOL
    for name, got, want in zip(("A_gu", "B_gu", "A_d", "B_d"), leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= REL_TOL, f"{name}: {got.grad.norm():.4g} vs {want.grad.norm():.4g}"


def test_engine_backward_gives_per_expert_db_for_an_expanded_b(case, engine):
    A = 0.2 * torch.randn(E, R, H)
    B_one = 0.2 * torch.randn(1, 2 * I, R)
    expanded, copied = ExpertLoRA(A, B_one.expand(E, -1, -1), 1.0), ExpertLoRA(A, B_one.expand(E, -1, -1).clone(), 1.0)
    results = []
    for lora in (expanded, copied):
        _, saved = forward(engine, case, lora_gate_up=lora)
        results.append(engine.backward(case.dy, case.x, case.ids, case.w, saved, lora_gate_up=lora))
    (dA_e, dB_e), (dA_c, dB_c) = results[0][2], results[1][2]
    assert dB_e.shape == (E, 2 * I, R) and dB_e.is_contiguous()
    assert torch.equal(dB_e, dB_c) and torch.equal(dA_e, dA_c)


@pytest.mark.parametrize("make_b", [
    lambda: torch.zeros(1, 2 * I, R).expand(E, -1, -1),                     # stride 0 on the expert dim
    lambda: torch.zeros(E, 2 * I, 1).expand(-1, -1, R),                     # stride 0 on the rank dim
    lambda: torch.zeros(E * 2 * I * R).as_strided((E, 2 * I, R), (R, R, 1)),  # experts one row apart
])
def test_ops_refuse_a_b_whose_elements_overlap(case, engine, make_b):
    lora = ExpertLoRA(torch.zeros(E, R, H), make_b(), 1.0)
    with pytest.raises(ValueError, match=r"gate_up LoRA B has overlapping strides .* pass a .contiguous\(\) copy"):
        ops.experts_forward(engine._handle, engine.dims, case.x, case.ids, case.w, lora, None, True)


def test_library_refuses_db_through_overlapping_strides(case, engine):
    """The C boundary's own check: a raw call asking for dB with B strides (0, R, 1)."""
    ffi, lib = load()
    A, B, dB = torch.zeros(E, R, H), torch.zeros(2 * I, R), torch.zeros(2 * I, R)
    lora = ExpertLoRA(A, B.expand(E, -1, -1), 1.0)
    _, saved = forward(engine, case, lora_gate_up=lora)
    keep: dict = {}
    routing = ops._routing_descriptor(case.ids.contiguous(), case.w.contiguous(), keep)
    l = ffi.new("kt_lora *")
    l.A, l.B, l.rank, l.scale = ffi.cast("float *", A.data_ptr()), ffi.cast("float *", B.data_ptr()), R, 1.0
    l.B_stride_e, l.B_stride_out, l.B_stride_rank = 0, R, 1
    grads = ffi.new("kt_gradients *")
    grads.lora_gate_up.dB = ffi.cast("float *", dB.data_ptr())
    s = ffi.new("kt_saved_activations *")
    s.gate_up = ffi.cast("uint16_t *", saved.gate_up.data_ptr())
    s.lora_gate_up = ffi.cast("float *", saved.lora_gate_up.data_ptr())
    status = lib.kt_experts_backward(engine._handle, grads, ffi.cast("uint16_t *", case.dy.data_ptr()),
                                     ffi.cast("uint16_t *", case.x.data_ptr()), routing, s, l, ffi.NULL)
    assert status == lib.KT_ERR_INVALID_ARGUMENT
    assert b"gate_up LoRA B strides overlap" in ffi.string(lib.kt_last_error())


@pytest.mark.parametrize("arg", ["x", "dy", "saved"])
def test_expanded_activations_are_refused_not_misread(case, engine, arg):
    _, saved = forward(engine, case)
    x, dy = case.x, case.dy
    if arg == "x":
        x = case.x[:1].expand(T, H)
    elif arg == "dy":
        dy = case.dy[:1].expand(T, H)
    else:
        saved = ExpertActivations(saved.gate_up[:1].expand(T * K, 2 * I), None, None)
    with pytest.raises(ValueError, match=r"must be contiguous, got strides \(0, .*pass a .contiguous\(\) copy"):
        engine.backward(dy, x, case.ids, case.w, saved)


def test_expanded_routing_is_copied(case, engine):
    ids, w = case.ids[:1].expand(T, K), case.w[:1].expand(T, K)
    y, _ = forward(engine, case, ids=ids, w=w)
    want, _ = forward(engine, case, ids=ids.contiguous(), w=w.contiguous())
    assert torch.equal(y, want)


def test_storage_offsets_are_honoured(case, engine):
    """Views that start inside their storage (slices) are read from their first element."""
    big_x = torch.cat([torch.zeros(3, H, dtype=torch.bfloat16), case.x])
    big_ids = torch.cat([torch.full((2, K), E), case.ids])
    y, _ = forward(engine, case, x=big_x[3:], ids=big_ids[2:], w=torch.cat([torch.ones(1, K), case.w])[1:])
    want, _ = forward(engine, case)
    assert big_x[3:].storage_offset() == 3 * H and torch.equal(y, want)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts one byte past an element boundary."""
    raw = bytearray(t.numel() * t.element_size() + 1)
    out = torch.frombuffer(raw, dtype=t.dtype, offset=1, count=t.numel()).view(t.shape)
    out.copy_(t)
    out._raw = raw   # keep the buffer alive
    return out


def test_misaligned_tensors_are_refused(case, engine):
    with pytest.raises(ValueError, match="hidden_states is not aligned to its 2-byte elements"):
        forward(engine, case, x=misaligned(case.x))
    lora = ExpertLoRA(misaligned(torch.zeros(E, R, H)), torch.zeros(E, 2 * I, R), 1.0)
    with pytest.raises(ValueError, match="gate_up LoRA A is not aligned"):
        forward(engine, case, lora_gate_up=lora)


def test_library_refuses_misaligned_pointers(case, engine):
    ffi, lib = load()
    keep: dict = {}
    routing = ops._routing_descriptor(case.ids.contiguous(), case.w.contiguous(), keep)
    y = torch.empty(T * H + 1, dtype=torch.bfloat16)
    odd = ffi.cast("uint16_t *", case.x.data_ptr() + 1)
    status = lib.kt_experts_forward(engine._handle, ffi.cast("uint16_t *", y.data_ptr()), ffi.NULL, odd, routing,
                                    ffi.NULL, ffi.NULL)
    assert status == lib.KT_ERR_INVALID_ARGUMENT and b"x pointer" in ffi.string(lib.kt_last_error())
    routing.ids = ffi.cast("int64_t *", keep["top_k_index"].data_ptr() + 4)
    status = lib.kt_experts_forward(engine._handle, ffi.cast("uint16_t *", y.data_ptr()), ffi.NULL,
                                    ffi.cast("uint16_t *", case.x.data_ptr()), routing, ffi.NULL, ffi.NULL)
    assert status == lib.KT_ERR_INVALID_ARGUMENT and b"not aligned" in ffi.string(lib.kt_last_error())


def test_outputs_that_alias_inputs_are_refused(case, engine):
    x = case.x.clone()
    with pytest.raises(ValueError, match="y shares memory with hidden_states"):
        forward(engine, case, x=x, empty=lambda shape, dtype: x)
    rows = torch.cat([case.x, case.x])
    with pytest.raises(ValueError, match="y shares memory with hidden_states"):   # one row of it
        forward(engine, case, x=rows[:T], empty=lambda shape, dtype: rows[T - 1:2 * T - 1])
    _, saved = forward(engine, case)
    dy = case.dy.clone()
    with pytest.raises(ValueError, match="dx shares memory with grad_output"):
        engine.backward(dy, case.x, case.ids, case.w, saved,
                        empty=lambda shape, dtype: dy if dtype == torch.bfloat16 else torch.empty(shape, dtype=dtype))


def test_load_copies_layouts_it_cannot_read(case):
    """Transposed or expanded weights are copied to unit column stride, not refused or misread."""
    engine = ExpertEngine(case.gate_up, case.down)
    gate_up_t = case.gate_up[0].float().t().contiguous().t()     # column stride 2I
    rows = case.gate_up[0, :1].expand(2 * I, H)                   # row stride 0
    engine.load_expert(0, gate_up_t, case.down[0])
    engine.load_expert(1, rows, case.down[1])
    gate_up, _ = engine.unpack()
    assert torch.equal(gate_up[0], case.gate_up[0]) and torch.equal(gate_up[1], rows)


@pytest.mark.parametrize("make, overlaps", [
    (lambda: torch.zeros(4, 6, 3), False),
    (lambda: torch.zeros(6, 3 * 4).view(6, 3, 4).permute(2, 0, 1), False),          # PEFT's B view
    (lambda: torch.zeros(3, 6).t(), False),
    (lambda: torch.zeros(8, 9)[::2, 1::3], False),
    (lambda: torch.zeros(1, 6, 3).expand(4, 6, 3), True),
    (lambda: torch.zeros(6, 1).expand(6, 3), True),
    (lambda: torch.zeros(20).as_strided((4, 3), (2, 1)), True),                   # rows overlap
    (lambda: torch.zeros(1, 5).as_strided((1, 5), (0, 1)), False),                # stride 0 on a size-1 dim
    (lambda: torch.zeros(0, 3).expand(0, 3), False),
])
def test_internal_overlap_is_judged_from_strides(make, overlaps):
    assert pointers.has_internal_overlap(make()) is overlaps
