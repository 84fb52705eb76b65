"""Every refusal at the engine's Python surface names the expected layout, what came instead and
what to pass: wrong shapes, dtypes, devices, ids, types, sizes (ExpertEngine and ops)."""

from __future__ import annotations

import pytest
import torch

from kt_trl._native import KTInvalidArgumentError, ops
from kt_trl.engine import ExpertEngine, ExpertLoRA

E, H, I, T, K = 4, 32, 16, 3, 2


@pytest.fixture(scope="module")
def engine():
    return ExpertEngine(torch.randn(E, 2 * I, H), torch.randn(E, H, I))


def inputs(x=None, ids=None, w=None):
    x = torch.randn(T, H).bfloat16() if x is None else x
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]]) if ids is None else ids
    w = torch.rand(T, K) if w is None else w
    return x, ids, w


def saved_of(engine, **lora):
    x, ids, w = inputs()
    return x, ids, w, engine.forward(x, ids, w, **lora)[1]


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([0, 1, 2]), r"top_k_index must be \[T, k\] \(k expert ids for each of T tokens\), got shape \[3\]"),
    (torch.zeros(3, 2, 1, dtype=torch.long), r"top_k_index must be \[T, k\].*got shape \[3, 2, 1\]"),
])
def test_routing_ids_of_the_wrong_rank(engine, ids, message):
    x, _, _ = inputs()
    with pytest.raises(ValueError, match=message):
        engine.forward(x, ids, torch.rand(ids.shape))
    _, _, _, saved = saved_of(engine)
    with pytest.raises(ValueError, match=message):
        engine.backward(x, x, ids, torch.rand(ids.shape), saved)


@pytest.mark.parametrize("w, message", [
    (torch.rand(T), r"top_k_weights must be \[T, k\] = \[3, 2\] like top_k_index, got \[3\]$"),
    (torch.rand(T, 3), r"got \[3, 3\]: k \(experts per token\) 2 vs 3"),
    (torch.rand(4, K), r"got \[4, 2\]: T \(tokens\) 3 vs 4"),
])
def test_routing_weights_that_do_not_match_the_ids(engine, w, message):
    x, ids, _ = inputs()
    with pytest.raises(ValueError, match=message):
        engine.forward(x, ids, w)


def test_hidden_states_and_grad_output_of_another_token_count(engine):
    x, ids, w, saved = saved_of(engine)
    with pytest.raises(ValueError, match=r"hidden_states must have shape \[3, 32\] \[T, H\], got \[4, 32\]"):
        engine.forward(torch.randn(4, H).bfloat16(), ids, w)
    with pytest.raises(ValueError, match=r"grad_output must have shape \[3, 32\] \[T, H\], got \[3, 31\]"):
        engine.backward(torch.randn(T, 31).bfloat16(), x, ids, w, saved)


def test_unsupported_dtypes(engine):
    x, ids, w = inputs()
    with pytest.raises(TypeError, match=r"hidden_states must be torch.bfloat16, got torch.float32; convert it with "
                                        r"\.to\(torch.bfloat16\)"):
        engine.forward(x.float(), ids, w)
    with pytest.raises(TypeError, match="top_k_index must hold integer expert ids .* got torch.float32"):
        engine.forward(x, ids.float(), w)     # not silently truncated to ints
    with pytest.raises(TypeError, match="top_k_weights must be a floating-point tensor .* got torch.int64"):
        engine.forward(x, ids, torch.ones(T, K, dtype=torch.long))
    with pytest.raises(TypeError, match="gate_up LoRA A must be torch.float32, got torch.float64"):
        engine.forward(x, ids, w, lora_gate_up=ExpertLoRA(torch.zeros(E, 2, H).double(), torch.zeros(E, 2 * I, 2), 1))


def test_other_dtypes_of_ids_and_weights_are_converted(engine):
    x, ids, w = inputs()
    want, _ = engine.forward(x, ids, w)
    got, _ = engine.forward(x, ids.to(torch.int16), w.double())
    assert torch.equal(got, want)


def test_tensors_off_the_cpu(engine):
    x, ids, w = inputs()
    with pytest.raises(ValueError, match="hidden_states is on the meta device and holds no data"):
        engine.forward(x.to("meta"), ids, w)
    with pytest.raises(ValueError, match="top_k_index is on the meta device"):
        engine.forward(x, ids.to("meta"), w)
    with pytest.raises(ValueError, match="y is on the meta device"):
        engine.forward(x, ids, w, empty=lambda shape, dtype: torch.empty(shape, dtype=dtype, device="meta"))


@pytest.mark.parametrize("bad_id, slot", [(5, "token 1, slot 1"), (-1, "token 1, slot 1"), (1 << 40, "token 1, slot 1")])
def test_out_of_range_id_names_value_and_position(engine, bad_id, slot):
    x, _, w = inputs()
    ids = torch.tensor([[0, 1], [2, bad_id], [1, 2]])
    with pytest.raises(KTInvalidArgumentError, match=rf"expert id {bad_id} at \[{slot}\] is out of range \[0, 4\] "
                                                     r"\(4 = skip\)"):
        engine.forward(x, ids, w)


def test_the_skip_sentinel_e_is_accepted(engine):
    x, _, w = inputs()
    y, _ = engine.forward(x, torch.tensor([[0, E], [E, E], [1, 2]]), w)
    assert torch.count_nonzero(y[1]) == 0


def test_wrong_argument_types(engine):
    x, ids, w = inputs()
    with pytest.raises(TypeError, match="top_k_index must be a torch.Tensor, got list"):
        engine.forward(x, [[0, 1]] * T, w)
    with pytest.raises(TypeError, match="hidden_states must be a torch.Tensor, got ndarray"):
        engine.forward(x.float().numpy(), ids, w)
    with pytest.raises(TypeError, match=r"lora_gate_up must be an ExpertLoRA\(A, B, scale\), got tuple"):
        engine.forward(x, ids, w, lora_gate_up=(torch.zeros(E, 2, H), torch.zeros(E, 2 * I, 2), 1.0))
    _, _, _, saved = saved_of(engine)
    with pytest.raises(TypeError, match="saved must be the ExpertActivations of the forward, got tuple"):
        engine.backward(x, x, ids, w, saved.as_tuple())
    with pytest.raises(TypeError, match="gate_up must be a torch.Tensor"):
        ExpertEngine([[1.0]], torch.zeros(E, H, I))


def test_lora_rank_zero_and_non_finite_scale(engine):
    x, ids, w = inputs()
    with pytest.raises(ValueError, match=r"gate_up LoRA A must have shape \[E, r, in\] = \[4, r, 32\] with r >= 1, "
                                         r"got \[4, 0, 32\]; pass lora_gate_up=None"):
        engine.forward(x, ids, w, lora_gate_up=ExpertLoRA(torch.zeros(E, 0, H), torch.zeros(E, 2 * I, 0), 1.0))
    with pytest.raises(ValueError, match="down LoRA scale must be finite, got nan"):
        engine.forward(x, ids, w, lora_down=ExpertLoRA(torch.zeros(E, 2, I), torch.zeros(E, H, 2), float("nan")))


def test_saved_activations_of_another_lora_setup(engine):
    lora = ExpertLoRA(torch.zeros(E, 2, H), torch.zeros(E, 2 * I, 2), 1.0)
    x, ids, w, saved = saved_of(engine, lora_gate_up=lora)
    with pytest.raises(ValueError, match="saved activations hold gate_up LoRA rows but lora_gate_up is None"):
        engine.backward(x, x, ids, w, saved)
    x, ids, w, saved = saved_of(engine)
    with pytest.raises(ValueError, match="saved activations lack gate_up LoRA rows but lora_gate_up is given"):
        engine.backward(x, x, ids, w, saved, lora_gate_up=lora)


def test_experts_given_with_the_wrong_number_of_tensors():
    experts = [(torch.zeros(2 * I, H), torch.zeros(H, I), torch.zeros(2 * I))] * E
    with pytest.raises(ValueError, match=r"expert 0 was given 3 tensors; give \(gate_up, down\) or"):
        ExpertEngine.from_experts(E, H, I, experts)


def test_ops_check_sizes_against_the_handle(engine):
    """A raw caller's sizes must be the engine's: else C would run past buffers sized for others."""
    with pytest.raises(ValueError, match=r"sizes \(E, H, I\) = \(4, 8, 8\) do not match the engine's \(4, 32, 16\)"):
        ops.experts_unpack(engine._handle, 0, 8, 8)
    x, ids, w = inputs()
    with pytest.raises(ValueError, match="do not match the engine's"):
        ops.experts_forward(engine._handle, (2, H, I), x, ids, w, None, None, False)
    ffi, _ = ops.load()
    with pytest.raises(TypeError, match="kt_experts \\* from experts_create"):
        ops.experts_packed_bytes(ffi.NULL)
    with pytest.raises(ValueError, match="not a live one"):
        ops.experts_packed_bytes(ffi.cast("kt_experts *", 64))


@pytest.mark.parametrize("value, error, message", [
    (2.5, TypeError, "expert must be an int, got float"),
    (1 << 70, ValueError, r"expert = 1180591620717411303424 is out of range"),
])
def test_integer_arguments(engine, value, error, message):
    with pytest.raises(error, match=message):
        engine.load_expert(value, torch.zeros(2 * I, H), torch.zeros(H, I))


def test_host_empty_refuses_what_it_cannot_allocate():
    with pytest.raises(TypeError, match="host_empty allocates"):
        ops.host_empty((4,), torch.float64)
    with pytest.raises(ValueError, match=r"host_empty: sizes \(-1, 4\) and strides None must be >= 0"):
        ops.host_empty((-1, 4))
    with pytest.raises(ValueError, match="one stride a size"):
        ops.host_empty((4,), stride=(1, 1))
    with pytest.raises(TypeError):
        ops.host_empty((2.5,))
    with pytest.raises(KTInvalidArgumentError, match="host allocation size out of range"):
        ops.host_empty((1 << 40, 1 << 40))


def test_bias_shapes_are_checked_as_a_whole():
    """Found by the fuzzer: a gate_up_bias with more rows than experts was cut silently."""
    with pytest.raises(ValueError, match=r"gate_up_bias must have shape \[1, 32\] \[E, 2I\] for gate_up \[1, 32, 8\], "
                                         r"got \[2, 32\]"):
        ExpertEngine(torch.zeros(1, 32, 8), torch.zeros(1, 8, 16), gate_up_bias=torch.zeros(2, 32),
                     down_bias=torch.zeros(1, 8))
