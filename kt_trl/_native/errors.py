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


# The exception of each failing kt_status, by the name of its constant in kt_trl.h (the codes
# themselves are read from the library: tests/native/test_cdef.py checks every KT_ERR_* is here).
STATUS_TO_EXCEPTION = {
    "KT_ERR_INVALID_ARGUMENT": KTInvalidArgumentError,
    "KT_ERR_UNSUPPORTED_ISA": KTUnsupportedISAError,
    "KT_ERR_OUT_OF_MEMORY": KTOutOfMemoryError,
    "KT_ERR_INTERNAL": KTNativeError,
}


def check(lib, ffi, status: int, what: str) -> None:
    """Raise the exception of ``status`` with the engine's message (read on this thread)."""
    if status == lib.KT_OK:
        return
    message = ffi.string(lib.kt_last_error()).decode("utf-8", "replace")
    exc = next((e for name, e in STATUS_TO_EXCEPTION.items() if getattr(lib, name) == status), KTNativeError)
    raise exc(f"{what}: {message}")
