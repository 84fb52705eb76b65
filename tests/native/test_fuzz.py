"""The boundary fuzzer (fuzz_boundary.py) runs for a short fixed time with a fixed seed and finds
nothing: no crash, abort, hang, silently wrong result, valid input refused or invalid one accepted.

A crash kills the subprocess (a signal, or libFuzzer's nonzero exit); a broken contract raises in
the harness, which exits nonzero too. The run must also have done real work: enough executions,
and enough of them compared with the reference, so that it cannot pass by doing nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).with_name("fuzz_boundary.py")
SECONDS = 20
MIN_RUNS = 500
MIN_COMPARED = 100


def test_boundary_fuzz_finds_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("KT_TRL_ISA", "KT_TRL_THREADS", "KT_TRL_HIDE_CPU_FEATURES")}
    run = subprocess.run(
        [sys.executable, str(HARNESS), f"-max_total_time={SECONDS}", "-seed=1", "-timeout=60", "-rss_limit_mb=4096",
         f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SECONDS + 120,
    )
    log = run.stdout + run.stderr
    assert run.returncode == 0, f"the fuzzer found a problem (exit {run.returncode}):\n{log[-6000:]}"
    runs = re.search(r"Done (\d+) runs in", log)
    stats = re.findall(r"kt-fuzz: runs=(\d+) compared=(\d+)", log)
    assert runs and int(runs.group(1)) >= MIN_RUNS, log[-3000:]
    assert stats and int(stats[-1][1]) >= MIN_COMPARED, log[-3000:]
