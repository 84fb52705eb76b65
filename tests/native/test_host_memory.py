"""Engine outputs live in cached host memory that is recycled once torch frees them."""

from __future__ import annotations

import gc

import torch

from kt_trl._native import ops
from kt_trl._native.ffi import load


def cached_bytes() -> int:
    return load()[1].kt_host_cached_bytes()


def test_freed_blocks_are_cached_and_reused():
    gc.collect()
    before = cached_bytes()
    t = ops.host_empty((1 << 20,))   # 4 MiB
    t.fill_(3.0)
    del t
    gc.collect()
    with_block = cached_bytes()
    assert with_block >= before + (4 << 20)
    again = ops.host_empty((1 << 20,))   # the same size class comes back out of the cache
    assert cached_bytes() == with_block - (4 << 20)
    del again


def test_views_keep_the_block_alive():
    base = ops.host_empty((64, 64))
    base.fill_(1.0)
    view = base[10:20]
    del base
    gc.collect()
    other = ops.host_empty((64, 64))   # must not receive the block the view still uses
    other.fill_(5.0)
    assert torch.all(view == 1.0)


def test_strided_layout_matches_request():
    t = ops.host_empty((4, 6, 2), stride=(1, 8, 4))
    assert t.shape == (4, 6, 2) and t.stride() == (1, 8, 4)
    t.fill_(2.0)
    assert float(t.sum()) == 96.0


def test_bad_requests_return_a_status():
    ffi, lib = load()
    out = ffi.new("void **")
    assert lib.kt_host_alloc(ffi.NULL, 64) == lib.KT_ERR_INVALID_ARGUMENT
    assert b"NULL" in ffi.string(lib.kt_last_error())
    assert lib.kt_host_alloc(out, -1) == lib.KT_ERR_INVALID_ARGUMENT and out[0] == ffi.NULL
    assert b"out of range" in ffi.string(lib.kt_last_error())
    lib.kt_host_free(ffi.cast("void *", 64))   # not a block of the pool: ignored
    assert b"out of range" in ffi.string(lib.kt_last_error())   # and the message is left alone
