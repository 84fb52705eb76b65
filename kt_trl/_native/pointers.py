"""Tensors checked and cast to the C pointers the library reads: type, device, dtype, shape, strides,
alignment and aliasing, each failure a message naming the argument and what to pass instead.
Checks cost O(number of tensors), never O(elements)."""

from __future__ import annotations

import operator

import torch

from .ffi import load

_CTYPES = {torch.bfloat16: "uint16_t *", torch.float32: "float *", torch.int64: "int64_t *", torch.int32: "int32_t *",
           torch.float8_e4m3fn: "uint8_t *", torch.int8: "uint8_t *"}
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


def check_tensor(t, name: str) -> None:
    """``t`` is a dense tensor that holds data (any device): what every wrapper and `ExpertEngine` read."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; pass {name}.to_dense()")
    if t.is_meta:
        raise ValueError(f"{name} is on the meta device and holds no data; give a tensor with values")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether two indices of ``t`` may reach one element (e.g. a stride 0): by increasing stride, each dim
    must step past the span of the smaller ones (refuses a few exotic interleavings that do not overlap)."""
    if t.is_contiguous() or t.numel() == 0:
        return False
    span = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def as_ptr(t: torch.Tensor, *, dtype: torch.dtype, shape: tuple[int, ...], name: str, contiguous: bool = True,
           dims: str = ""):
    """``ffi.cast`` of ``t`` after checking type, device, dtype, shape, layout and alignment; ``contiguous=False``
    accepts any strides with distinct elements, ``dims`` names the shape in messages (``"[T, H]"``)."""
    ffi, _ = load()
    check_tensor(t, name)
    if not t.is_cpu:
        raise ValueError(f"{name} must be on the CPU, got {t.device}; move it with .cpu()")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}; convert it with .to({dtype})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}{f' {dims}' if dims else ''}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {t.stride()} for shape {list(t.shape)}; "
                         "pass a .contiguous() copy")
    if not contiguous and has_internal_overlap(t):
        raise ValueError(f"{name} has overlapping strides {t.stride()} for shape {list(t.shape)} (an expanded "
                         "view?): the engine needs distinct elements; pass a .contiguous() copy")
    if t.data_ptr() % t.element_size():
        raise ValueError(f"{name} is not aligned to its {t.element_size()}-byte elements (address "
                         f"{t.data_ptr():#x}); pass a .clone()")
    return ffi.cast(_CTYPES[dtype], t.data_ptr())


def _as_int(value, name: str, low: int = _INT64_RANGE[0], high: int = _INT64_RANGE[1]) -> int:
    """``value`` as a Python int in ``[low, high]`` (the C type's range), or a TypeError/ValueError."""
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not low <= v <= high:
        raise ValueError(f"{name} = {v} is out of range [{low}, {high}]")
    return v


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range ``[start, end)`` of the elements a (non-negative-strided) tensor reaches."""
    start, n = t.data_ptr(), t.numel()
    if n == 0 or t.is_contiguous():
        return start, start + n * t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_disjoint(outputs: dict, inputs: dict) -> None:
    """No output (``{name: tensor | None}``) shares bytes with another output or an input: the engine reads
    inputs while its threads write outputs, so aliasing would give wrong results, not an error."""
    outs = [(n, *_span(t)) for n, t in outputs.items() if t is not None]
    others = outs + [(n, *_span(t)) for n, t in inputs.items() if isinstance(t, torch.Tensor)]
    for i, (name, start, end) in enumerate(outs):
        for other, o_start, o_end in others[i + 1:]:
            if start < o_end and o_start < end:
                raise ValueError(f"{name} shares memory with {other}; the engine writes {name} while it reads "
                                 f"{other}: give {name} its own tensor")
