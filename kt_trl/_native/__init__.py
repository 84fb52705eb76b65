"""The native routed-experts engine: runtime selection and information.

Nothing is loaded at import; the library is opened on first use.
"""

from __future__ import annotations

import logging

from .errors import KTInvalidArgumentError, KTNativeError, KTOutOfMemoryError, KTUnsupportedISAError

__all__ = [
    "KTNativeError", "KTInvalidArgumentError", "KTOutOfMemoryError", "KTUnsupportedISAError",
    "configure", "runtime_info", "available_isas",
]

logger = logging.getLogger("kt_trl")
_configured = False


def configure(isa: str | None = None, threads: int | None = None) -> dict:
    """Select the ISA path and worker count of the engine.

    Args:
        isa (`str`, *optional*): ``"auto"``, ``"amx"``, ``"avx512"``, ``"avx2"`` or ``"scalar"``;
            defaults to ``KT_TRL_ISA`` or ``"auto"`` (the best the CPU supports).
        threads (`int`, *optional*): worker threads; defaults to ``KT_TRL_THREADS`` or one per
            physical core.
    Returns:
        `dict`: what :func:`runtime_info` returns.
    Raises:
        ValueError: an unknown ISA name or a negative thread count (argument or environment).
        KTUnsupportedISAError: the CPU lacks the requested path (or ``KT_TRL_HIDE_CPU_FEATURES``
            hides a feature it needs).
    """
    global _configured
    from . import isa as isa_mod
    from .ops import cpu_info, runtime_configure

    runtime_configure(isa_mod.requested_isa(isa), isa_mod.requested_threads(threads))
    _configured = True
    info = cpu_info()
    logger.info("kt_trl native engine: ISA %s, %d threads", info["isa"], info["threads"])
    return info


def ensure_configured() -> None:
    """Apply the environment's settings once, before the first engine call."""
    if not _configured:
        configure()


def runtime_info() -> dict:
    """Active ISA path, worker threads, physical cores and detected CPU features.

    Applies the environment's settings first if nothing has configured the engine yet, so what it
    reports is what the next engine call uses.
    """
    from .ops import cpu_info

    ensure_configured()
    return cpu_info()


def available_isas() -> list[str]:
    """ISA paths this CPU can run, best last (less those ``KT_TRL_HIDE_CPU_FEATURES`` hides)."""
    from .isa import ISA_NAMES
    from .ops import isa_available

    return [name for name in ISA_NAMES if isa_available(name)]
