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
        KTUnsupportedISAError: the CPU lacks the requested path.
    """
    global _configured
    from . import isa as isa_mod
    from .ops import runtime_configure

    runtime_configure(isa_mod.isa_code(isa_mod.requested_isa(isa)), isa_mod.requested_threads(threads))
    _configured = True
    info = runtime_info()
    logger.info("kt_trl native engine: ISA %s, %d threads", info["isa"], info["threads"])
    return info


def ensure_configured() -> None:
    """Apply the environment's settings once, before the first engine call."""
    if not _configured:
        configure()


def runtime_info() -> dict:
    """Active ISA path, worker threads, physical cores and detected CPU features."""
    from .ops import cpu_info

    return cpu_info()


def available_isas() -> list[str]:
    """ISA paths this CPU can run, best last."""
    from .ops import isa_available

    return [name for name in ("scalar", "avx2", "avx512", "amx") if isa_available(name)]
