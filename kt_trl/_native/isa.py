"""ISA and thread settings: the one place that reads ``KT_TRL_ISA`` and ``KT_TRL_THREADS``."""

from __future__ import annotations

import os

ISA_CODES = {"auto": -1, "scalar": 0, "avx2": 1, "avx512": 2, "amx": 3}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}
ISA_CHOICES = ("auto", "scalar", "avx2", "avx512", "amx")

CPU_FEATURE_BITS = {
    "avx2": 1, "fma": 2, "f16c": 4, "avx512f": 8, "avx512bw": 16, "avx512vl": 32,
    "avx512_bf16": 64, "amx_tile": 128, "amx_bf16": 256, "amx_permitted": 512,
}


def isa_code(name: str) -> int:
    """Code of an ISA name; ValueError listing the valid names otherwise."""
    key = name.strip().lower()
    if key not in ISA_CODES:
        raise ValueError(f"unknown ISA {name!r}; use one of {sorted(ISA_CODES)}")
    return ISA_CODES[key]


def requested_isa(isa: str | None) -> str:
    """The argument if given, else ``KT_TRL_ISA``, else ``auto``."""
    return isa if isa is not None else os.environ.get("KT_TRL_ISA", "auto")


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
