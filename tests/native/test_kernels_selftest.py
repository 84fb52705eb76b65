"""The op-level kernel self-test (native/tests/kernels_selftest.cpp): built with CMake, then run.

It checks every kernel of every ISA table this CPU runs against the scalar oracle with per-op
error bounds (and the oracle against a double-precision reference). CMake is a build requirement
(pip's ``cmake`` comes with scikit-build-core on CI), so a missing one fails the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

NATIVE = Path(__file__).resolve().parents[2] / "native"


def find_cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:   # pip's cmake package, when its script directory is not on PATH
        import cmake
    except ImportError:
        pytest.fail("cmake is neither on PATH nor importable (pip install cmake); the kernel self-test needs it")
    return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")


def test_kernels_match_the_scalar_oracle(tmp_path):
    cmake = find_cmake()
    build = tmp_path / "build"
    configure = [cmake, "-S", str(NATIVE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DKT_TRL_BUILD_SELFTEST=ON"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run = subprocess.run(configure, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    jobs = str(max(2, len(os.sched_getaffinity(0))))
    run = subprocess.run([cmake, "--build", str(build), "--target", "kt_kernels_selftest", "--parallel", jobs],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    run = subprocess.run([str(build / "kt_kernels_selftest")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr
    assert run.stdout.rstrip().endswith(" 0 failed"), run.stdout[-2000:]
