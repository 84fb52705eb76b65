"""Native-engine test helpers: the ISA parametrisation and a small MoE case builder."""

from __future__ import annotations

import pytest

from kt_trl._native import available_isas, configure
from kt_trl._native.isa import ISA_NAMES


def isa_params():
    """Every ISA path, each marked ``isa(name)``; paths this CPU lacks are skipped with a reason."""
    return [pytest.param(name, marks=pytest.mark.isa(name), id=name) for name in ISA_NAMES]


def pytest_collection_modifyitems(config, items):
    have = set(available_isas())
    for item in items:
        for mark in item.iter_markers("isa"):
            if mark.args[0] not in have:
                item.add_marker(pytest.mark.skip(reason=f"this CPU has no {mark.args[0]} path (runs on an AMX machine)"))


@pytest.fixture
def use_isa():
    """Select an ISA path and thread count for one test, restoring the default afterwards."""

    def select(isa: str, threads: int = 2):
        return configure(isa=isa, threads=threads)

    yield select
    configure(isa="auto", threads=2)
