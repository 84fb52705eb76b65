"""Bad input gets a typed exception naming the problem: from the Python checks and from the C boundary."""

from __future__ import annotations

import pytest
import torch

from kt_trl._native import KTInvalidArgumentError, KTUnsupportedISAError, available_isas, configure
from kt_trl._native.ffi import load
from kt_trl.engine import ExpertEngine, ExpertLoRA

from .conftest import ALL_ISAS


@pytest.fixture(scope="module")
def engine():
    return ExpertEngine(torch.randn(4, 64, 32), torch.randn(4, 32, 32))


def forward(engine, x=None, ids=None, w=None, **kw):
    x = torch.randn(3, 32).bfloat16() if x is None else x
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]]) if ids is None else ids
    w = torch.rand(ids.shape) if w is None else w
    return engine.forward(x, ids, w, **kw)


@pytest.mark.parametrize("bad_id", [-1, 5, 1 << 40])
def test_out_of_range_id(engine, bad_id):
    with pytest.raises(KTInvalidArgumentError, match="out of range"):
        forward(engine, ids=torch.tensor([[0, 1], [2, bad_id], [1, 2]]))


def test_duplicate_id_in_a_row(engine):
    with pytest.raises(KTInvalidArgumentError, match="appears twice"):
        forward(engine, ids=torch.tensor([[0, 1], [3, 3], [1, 2]]))


def test_sentinel_may_repeat(engine):
    y, _ = forward(engine, ids=torch.tensor([[0, 4], [4, 4], [1, 2]]))
    assert torch.count_nonzero(y[1]) == 0


def test_non_finite_weight(engine):
    with pytest.raises(KTInvalidArgumentError, match="not finite"):
        forward(engine, w=torch.tensor([[0.5, float("nan")], [1, 1], [1, 1]]))


def test_wrong_hidden_shape(engine):
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[3, 32\]"):
        forward(engine, x=torch.randn(3, 31).bfloat16())


def test_wrong_dtypes(engine):
    with pytest.raises(TypeError, match="hidden_states must be torch.bfloat16"):
        forward(engine, x=torch.randn(3, 32))


def test_non_contiguous_hidden(engine):
    with pytest.raises(ValueError, match="contiguous"):
        forward(engine, x=torch.randn(32, 3).bfloat16().t())


def test_lora_shape_mismatch(engine):
    bad = ExpertLoRA(torch.zeros(4, 2, 31), torch.zeros(4, 64, 2), 1.0)
    with pytest.raises(ValueError, match="gate_up LoRA A must have shape"):
        forward(engine, lora_gate_up=bad)


def test_weight_shape_mismatch():
    with pytest.raises(ValueError, match="down must be"):
        ExpertEngine(torch.zeros(2, 64, 32), torch.zeros(2, 32, 16))


def test_null_pointers_rejected_by_the_library(engine):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    ids = torch.zeros(2, 1, dtype=torch.long)
    w = torch.ones(2, 1)
    routing.ids, routing.ids_dtype = ffi.cast("int64_t *", ids.data_ptr()), 3
    routing.weights, routing.weights_dtype = ffi.cast("float *", w.data_ptr()), 0
    routing.tokens, routing.top_k = 2, 1
    status = lib.kt_experts_forward(engine._handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, routing,
                                    ffi.NULL, ffi.NULL)
    assert status == 1 and b"NULL" in ffi.string(lib.kt_last_error())
    assert lib.kt_experts_forward(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, routing,
                                  ffi.NULL, ffi.NULL) == 1
    assert lib.kt_experts_forward(engine._handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL,
                                  ffi.NULL, ffi.NULL) == 1


def test_bad_routing_descriptor(engine):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    routing.tokens, routing.top_k, routing.ids_dtype, routing.weights_dtype = 1, 1, 7, 0
    assert lib.kt_experts_forward(engine._handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, routing,
                                  ffi.NULL, ffi.NULL) == 1
    assert b"int64 or int32" in ffi.string(lib.kt_last_error())


def test_sizes_that_overflow():
    ffi, lib = load()
    out = ffi.new("kt_experts **")
    assert lib.kt_experts_create(out, 65536, 1 << 20, 1 << 20) in (1, 3)   # refused, not crashed
    assert out[0] == ffi.NULL
    assert lib.kt_experts_create(out, 0, 32, 32) == 1
    assert b"num_experts" in ffi.string(lib.kt_last_error())


def test_routing_tokens_that_overflow(engine):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    routing.tokens, routing.top_k, routing.ids_dtype, routing.weights_dtype = 1 << 60, 8, 3, 0
    assert lib.kt_experts_forward(engine._handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, routing,
                                  ffi.NULL, ffi.NULL) == 1
    assert b"too large" in ffi.string(lib.kt_last_error())


def test_expert_without_weights():
    ffi, lib = load()
    out = ffi.new("kt_experts **")
    assert lib.kt_experts_create(out, 2, 32, 32) == 0
    handle = ffi.gc(out[0], lib.kt_experts_destroy)
    routing = ffi.new("kt_routing *")
    assert lib.kt_experts_forward(handle, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, routing,
                                  ffi.NULL, ffi.NULL) == 1
    assert b"kt_experts_load" in ffi.string(lib.kt_last_error())


def test_load_index_and_stride_checked(engine):
    ffi, lib = load()
    buf = torch.zeros(64, 32, dtype=torch.bfloat16)
    p = ffi.cast("uint16_t *", buf.data_ptr())
    assert lib.kt_experts_load(engine._handle, 4, p, 32, p, 32) == 1
    assert lib.kt_experts_load(engine._handle, 0, p, 16, p, 32) == 1
    assert b"row stride" in ffi.string(lib.kt_last_error())


def test_backward_without_saved_activations(engine):
    ids, w = torch.tensor([[0, 1]]), torch.ones(1, 2)
    x = torch.randn(1, 32).bfloat16()
    _, saved = engine.forward(x, ids, w, save=False)
    with pytest.raises(KTInvalidArgumentError, match="saved_gate_up"):
        engine.backward(x, x, ids, w, saved)


def test_unknown_isa_name():
    with pytest.raises(ValueError, match="unknown ISA"):
        configure(isa="neon")


def test_negative_threads():
    with pytest.raises(ValueError, match="threads"):
        configure(threads=-1)


def test_forcing_an_unavailable_isa_raises_not_sigill():
    missing = [name for name in ALL_ISAS if name not in available_isas()]
    if not missing:
        pytest.skip("this CPU has every ISA path; nothing to force")
    with pytest.raises(KTUnsupportedISAError, match=missing[-1]):
        configure(isa=missing[-1])
    configure(isa="auto", threads=2)


def test_isa_from_environment(monkeypatch):
    monkeypatch.setenv("KT_TRL_ISA", "scalar")
    try:
        assert configure()["isa"] == "scalar"
    finally:
        monkeypatch.delenv("KT_TRL_ISA")
        configure(isa="auto", threads=2)


def test_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation"):
        ExpertEngine(torch.zeros(2, 64, 32), torch.zeros(2, 32, 32), activation="gelu")


def test_bad_activation_parameters_rejected_by_the_library():
    with pytest.raises(KTInvalidArgumentError, match="limit > 0"):
        ExpertEngine(torch.zeros(2, 64, 32), torch.zeros(2, 32, 32), activation="clamped_swiglu", limit=-1.0)


def test_bias_shapes():
    with pytest.raises(ValueError, match="gate_up_bias must have shape"):
        ExpertEngine(torch.zeros(2, 64, 32), torch.zeros(2, 32, 32), gate_up_bias=torch.zeros(2, 63),
                     down_bias=torch.zeros(2, 32))
    with pytest.raises(ValueError, match="or neither"):
        ExpertEngine(torch.zeros(2, 64, 32), torch.zeros(2, 32, 32), gate_up_bias=torch.zeros(2, 64))
