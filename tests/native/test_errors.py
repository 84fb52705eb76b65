"""Bad input gets a typed exception naming the problem: from the Python checks and from the C boundary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kt_trl._native import KTInvalidArgumentError, KTUnsupportedISAError, configure
from kt_trl._native.ffi import load
from kt_trl.engine import ExpertEngine, ExpertLoRA


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


def raw_forward(handle, routing):
    """kt_experts_forward with every buffer NULL: what the library's own checks see."""
    ffi, lib = load()
    return lib.kt_experts_forward(handle, ffi.NULL, ffi.NULL, ffi.NULL, routing, ffi.NULL, ffi.NULL)


def two_token_routing(keep: list):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    ids = torch.zeros(2, 1, dtype=torch.long)
    w = torch.ones(2, 1)
    keep += [ids, w]
    routing.ids, routing.ids_dtype = ffi.cast("int64_t *", ids.data_ptr()), lib.KT_DTYPE_INT64
    routing.weights, routing.weights_dtype = ffi.cast("float *", w.data_ptr()), lib.KT_DTYPE_FP32
    routing.tokens, routing.top_k = 2, 1
    return routing


def test_null_pointers_rejected_by_the_library(engine):
    ffi, lib = load()
    keep: list = []   # the routing's tensors, alive for the calls
    routing = two_token_routing(keep)
    status = raw_forward(engine._handle, routing)
    assert status == lib.KT_ERR_INVALID_ARGUMENT and b"NULL" in ffi.string(lib.kt_last_error())
    assert raw_forward(ffi.NULL, routing) == lib.KT_ERR_INVALID_ARGUMENT
    assert raw_forward(engine._handle, ffi.NULL) == lib.KT_ERR_INVALID_ARGUMENT


def test_backward_null_gradients_rejected_by_the_library(engine):
    ffi, lib = load()
    keep: list = []   # the routing's tensors, alive for the calls
    routing = two_token_routing(keep)
    status = lib.kt_experts_backward(engine._handle, ffi.NULL, ffi.NULL, ffi.NULL, routing, ffi.NULL, ffi.NULL,
                                     ffi.NULL)
    assert status == lib.KT_ERR_INVALID_ARGUMENT and b"grads pointer is NULL" in ffi.string(lib.kt_last_error())
    grads = ffi.new("kt_gradients *")
    dA = torch.zeros(4, 2, 32)
    grads.lora_down.dA = ffi.cast("float *", dA.data_ptr())
    status = lib.kt_experts_backward(engine._handle, grads, ffi.NULL, ffi.NULL, routing, ffi.NULL, ffi.NULL, ffi.NULL)
    assert status == lib.KT_ERR_INVALID_ARGUMENT and b"without a down LoRA" in ffi.string(lib.kt_last_error())


def test_bad_routing_descriptor(engine):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    routing.tokens, routing.top_k, routing.ids_dtype, routing.weights_dtype = 1, 1, 7, lib.KT_DTYPE_FP32
    assert raw_forward(engine._handle, routing) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"int64 or int32" in ffi.string(lib.kt_last_error())


def test_sizes_that_overflow():
    ffi, lib = load()
    out = ffi.new("kt_experts **")
    refused = (lib.KT_ERR_INVALID_ARGUMENT, lib.KT_ERR_OUT_OF_MEMORY)
    assert lib.kt_experts_create(out, 65536, 1 << 20, 1 << 20, lib.KT_FORMAT_BF16, 0) in refused   # refused, not crashed
    assert out[0] == ffi.NULL
    assert lib.kt_experts_create(out, 0, 32, 32, lib.KT_FORMAT_BF16, 0) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"num_experts" in ffi.string(lib.kt_last_error())


def test_routing_tokens_that_overflow(engine):
    ffi, lib = load()
    routing = ffi.new("kt_routing *")
    routing.tokens, routing.top_k = 1 << 60, 8
    routing.ids_dtype, routing.weights_dtype = lib.KT_DTYPE_INT64, lib.KT_DTYPE_FP32
    assert raw_forward(engine._handle, routing) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"too large" in ffi.string(lib.kt_last_error())


def test_expert_without_weights():
    ffi, lib = load()
    out = ffi.new("kt_experts **")
    assert lib.kt_experts_create(out, 2, 32, 32, lib.KT_FORMAT_BF16, 0) == lib.KT_OK
    handle = ffi.gc(out[0], lib.kt_experts_destroy)
    routing = ffi.new("kt_routing *")
    assert raw_forward(handle, routing) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"kt_experts_load" in ffi.string(lib.kt_last_error())


def test_load_index_and_stride_checked(engine):
    ffi, lib = load()
    buf = torch.zeros(64, 32, dtype=torch.bfloat16)
    p = ffi.cast("uint16_t *", buf.data_ptr())
    assert lib.kt_experts_load(engine._handle, 4, p, 32, p, 32) == lib.KT_ERR_INVALID_ARGUMENT
    assert lib.kt_experts_load(engine._handle, 0, p, 16, p, 32) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"row stride" in ffi.string(lib.kt_last_error())
    assert lib.kt_experts_unpack(engine._handle, 4, p, p) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"expert index 4" in ffi.string(lib.kt_last_error())


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


# The feature each path needs that the one below it lacks: hiding it makes the path unavailable
# on every CPU, so the refusal is tested on machines that have every path too.
DISTINCT_FEATURE = {"avx2": "avx2", "avx512": "avx512f", "amx": "amx_bf16"}


@pytest.mark.parametrize("isa", list(DISTINCT_FEATURE))
def test_forcing_an_unavailable_isa_raises_not_sigill(monkeypatch, isa):
    monkeypatch.setenv("KT_TRL_HIDE_CPU_FEATURES", DISTINCT_FEATURE[isa])
    try:
        with pytest.raises(KTUnsupportedISAError, match=isa):
            configure(isa=isa)
    finally:
        monkeypatch.delenv("KT_TRL_HIDE_CPU_FEATURES")
        configure(isa="auto", threads=2)


def test_unknown_hidden_cpu_feature(monkeypatch):
    monkeypatch.setenv("KT_TRL_HIDE_CPU_FEATURES", "avx2,sse9")
    try:
        with pytest.raises(ValueError, match="unknown CPU feature 'sse9'"):
            configure()
    finally:
        monkeypatch.delenv("KT_TRL_HIDE_CPU_FEATURES")
        configure(isa="auto", threads=2)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing configured yet) with ``env`` added to the environment."""
    settings = ("KT_TRL_ISA", "KT_TRL_THREADS", "KT_TRL_HIDE_CPU_FEATURES")
    full_env = {k: v for k, v in os.environ.items() if k not in settings}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_forced_isa_from_environment_with_the_feature_hidden_raises():
    run = run_python("from kt_trl._native import configure\n"
                     "try:\n    configure()\nexcept Exception as e:\n    print(type(e).__name__, e)",
                     KT_TRL_ISA="amx", KT_TRL_HIDE_CPU_FEATURES="amx_bf16")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("KTUnsupportedISAError") and "'amx'" in run.stdout, run.stdout


def test_runtime_getters_are_pure_reads():
    run = run_python("from kt_trl._native.ffi import load\n"
                     "ffi, lib = load()\n"
                     "before = [(lib.kt_runtime_isa(), lib.kt_runtime_threads()) for _ in range(2)]\n"
                     "assert before == [(lib.KT_ISA_AUTO, 0)] * 2, before\n"
                     "assert lib.kt_runtime_configure(lib.KT_ISA_SCALAR, 1) == lib.KT_OK\n"
                     "print(lib.kt_runtime_isa() == lib.KT_ISA_SCALAR, lib.kt_runtime_threads())")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "1"]


def test_runtime_info_applies_the_environment_first():
    run = run_python("from kt_trl._native import runtime_info\nprint(runtime_info()['isa'])", KT_TRL_ISA="scalar")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "scalar"


def test_runtime_info_rejects_an_unknown_isa_from_the_environment():
    run = run_python("from kt_trl._native import runtime_info\nruntime_info()", KT_TRL_ISA="bogus")
    assert run.returncode != 0
    assert "ValueError: unknown ISA KT_TRL_ISA='bogus'; use one of ('auto', 'scalar'" in run.stderr, run.stderr


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
