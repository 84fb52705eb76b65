"""Locate the native library, read its cdef from the header installed beside it, dlopen it once.

Nothing else lives here: ops.py is the only module that calls into the library.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from .errors import KTNativeError

_LIB_NAME = "libkt_trl.so"
_HEADER = "kt_trl.h"
_CDEF_RE = re.compile(r"/\* cffi-cdef-begin \*/(.*?)/\* cffi-cdef-end \*/", re.S)


def _candidate_dirs() -> list[Path]:
    # An editable install may spread the package over several directories: search __path__.
    from kt_trl import _native

    dirs = [Path(p) for p in _native.__path__]
    override = os.environ.get("KT_TRL_LIBRARY_DIR")
    return ([Path(override)] if override else []) + dirs


def find_library() -> tuple[Path, Path]:
    """Paths of ``libkt_trl.so`` and the ``kt_trl.h`` read for the cdef."""
    for d in _candidate_dirs():
        lib = d / _LIB_NAME
        if lib.is_file():
            header = d / _HEADER
            if not header.is_file():   # source checkout: the header stays in native/include
                header = Path(__file__).resolve().parents[2] / "native" / "include" / _HEADER
            return lib, header
    raise KTNativeError(
        f"{_LIB_NAME} was not found in {[str(d) for d in _candidate_dirs()]}; "
        "install the package with `pip install -e .` (it builds the native library)"
    )


def read_cdef(header: Path) -> str:
    match = _CDEF_RE.search(header.read_text())
    if not match:
        raise KTNativeError(f"{header} has no cffi-cdef block")
    return match.group(1)


@functools.lru_cache(maxsize=None)
def load():
    """``(ffi, lib)``; loads the library on first use and checks its ABI version."""
    import cffi

    lib_path, header = find_library()
    ffi = cffi.FFI()
    cdef = read_cdef(header)
    ffi.cdef(cdef)
    lib = ffi.dlopen(str(lib_path))
    expected = int(re.search(r"KT_ABI_VERSION\s*=\s*(\d+)", cdef).group(1))
    if lib.kt_abi_version() != expected:
        raise KTNativeError(
            f"{lib_path} has ABI version {lib.kt_abi_version()} but {header} declares {expected}; "
            "rebuild with `pip install -e .`"
        )
    return ffi, lib
