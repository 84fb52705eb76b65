"""The cdef block of the header matches the built library."""

from __future__ import annotations

import re

from kt_trl._native.ffi import find_library, load, read_cdef


def test_every_cdef_function_resolves():
    ffi, lib = load()
    _, header = find_library()
    names = re.findall(r"\b(kt_[a-z_]+)\s*\(", read_cdef(header))
    assert "kt_experts_forward" in names and "kt_experts_backward" in names
    for name in names:
        assert getattr(lib, name) is not None, name


def test_abi_version_matches_header():
    ffi, lib = load()
    _, header = find_library()
    declared = int(re.search(r"KT_ABI_VERSION\s*=\s*(\d+)", read_cdef(header)).group(1))
    assert lib.kt_abi_version() == declared


def test_runtime_info_reports_isa_and_features():
    from kt_trl._native import available_isas, configure

    info = configure(isa="auto", threads=2)
    assert info["isa"] == available_isas()[-1]
    assert info["threads"] == 2
    assert info["physical_cores"] >= 1
    assert isinstance(info["cpu_features"], list)
