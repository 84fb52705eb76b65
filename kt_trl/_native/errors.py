"""Exceptions raised for native-engine failures, and the one status check."""

from __future__ import annotations


class KTNativeError(RuntimeError):
    """A call into the native engine failed."""


class KTInvalidArgumentError(KTNativeError, ValueError):
    """The engine rejected an argument (shape, pointer, id, size)."""


class KTUnsupportedISAError(KTNativeError):
    """The requested instruction-set path is not available on this CPU."""


class KTOutOfMemoryError(KTNativeError, MemoryError):
    """The engine could not allocate memory."""


# Status codes of native/include/kt_trl.h (KT_OK = 0).
STATUS_TO_EXCEPTION = {
    1: KTInvalidArgumentError,
    2: KTUnsupportedISAError,
    3: KTOutOfMemoryError,
    4: KTNativeError,
}


def check(lib, ffi, status: int, what: str) -> None:
    """Raise the exception of ``status`` with the engine's message (read on this thread)."""
    if status == 0:
        return
    message = ffi.string(lib.kt_last_error()).decode("utf-8", "replace")
    raise STATUS_TO_EXCEPTION.get(status, KTNativeError)(f"{what}: {message}")
