"""ISA, thread and CPU-feature settings: the one place that reads ``KT_TRL_ISA``, ``KT_TRL_THREADS``
and ``KT_TRL_HIDE_CPU_FEATURES``.

Only names live here, so that settings can be validated without loading the library; their
codes are the library's ``KT_ISA_*`` / ``KT_CPU_*`` constants, looked up by ops.py.
"""

from __future__ import annotations

import os

# The engine's ISA paths, best last (KT_ISA_SCALAR < ... < KT_ISA_AMX in kt_trl.h).
ISA_NAMES = ("scalar", "avx2", "avx512", "amx")
# What KTConfig(isa=...), configure(isa=...) and KT_TRL_ISA accept: "auto" picks the best path.
ISA_CHOICES = ("auto", *ISA_NAMES)


def parse_isa(name: str, *, source: str = "isa") -> str:
    """The canonical (lower-case) ISA name; ValueError naming the valid ones otherwise."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ISA_CHOICES:
        raise ValueError(f"unknown ISA {source}={name!r}; use one of {ISA_CHOICES}")
    return key


def requested_isa(isa: str | None) -> str:
    """The argument if given, else ``KT_TRL_ISA``, else ``auto``; validated."""
    if isa is not None:
        return parse_isa(isa)
    return parse_isa(os.environ.get("KT_TRL_ISA", "auto"), source="KT_TRL_ISA")


def requested_threads(threads: int | None) -> int:
    """The argument if given, else ``KT_TRL_THREADS``, else 0 (one per physical core)."""
    if threads is None:
        env = os.environ.get("KT_TRL_THREADS", "0")
        try:
            threads = int(env)
        except ValueError:
            raise ValueError(f"KT_TRL_THREADS must be an integer, got {env!r}") from None
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = one per physical core), got {threads}")
    return threads


def hidden_cpu_features() -> tuple[str, ...]:
    """``KT_TRL_HIDE_CPU_FEATURES``: comma-separated feature names (those of
    ``runtime_info()["cpu_features"]``, e.g. ``amx_bf16``) the engine must treat as absent, so that
    the refusal of a path can be tested on a CPU that has it. Names are checked by ops.py."""
    env = os.environ.get("KT_TRL_HIDE_CPU_FEATURES", "")
    return tuple(name.strip().lower() for name in env.split(",") if name.strip())
