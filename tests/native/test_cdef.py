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


def _constant_names(lib, prefix: str) -> set[str]:
    return {n for n in dir(lib) if n.startswith(prefix)}


def test_python_tables_match_the_library_constants():
    from kt_trl._native import ops
    from kt_trl._native.errors import STATUS_TO_EXCEPTION
    from kt_trl._native.isa import ISA_CHOICES, ISA_NAMES

    _, lib = load()
    # ISA names (needed before the library is loaded): every path, in the library's order, best last.
    assert list(ops.constants("ISA")) == ["auto", *ISA_NAMES] and ISA_CHOICES == ("auto", *ISA_NAMES)
    assert [getattr(lib, f"KT_ISA_{n.upper()}") for n in ISA_NAMES] == list(range(len(ISA_NAMES)))
    # Every failing status has its exception; every dtype constant a torch dtype.
    assert set(STATUS_TO_EXCEPTION) == _constant_names(lib, "KT_ERR_")
    assert set(ops.DTYPE_CONSTANTS.values()) == _constant_names(lib, "KT_DTYPE_")
    # Stages: one counter per KT_STAGE_* below KT_STAGE_COUNT.
    assert sorted(ops.constants("STAGE").values()) == list(range(lib.KT_STAGE_COUNT))
    assert list(ops.profile_read()) == list(ops.constants("STAGE"))
    # CPU features are distinct bits.
    bits = list(ops.constants("CPU").values())
    assert all(b > 0 and b & (b - 1) == 0 for b in bits) and len(set(bits)) == len(bits)
