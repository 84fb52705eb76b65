"""The README's engine example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_engine_example_runs_and_trains_every_input():
    (source,) = [block for block in _python_blocks() if "routed_experts(" in block]
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)  # noqa: S102 - our own README
    y, x = namespace["y"], namespace["x"]
    assert y.shape == x.shape and namespace["info"]["isa"] in ("scalar", "avx2", "avx512", "amx")
    for name in ("x", "top_k_weights", "A", "B"):
        grad = namespace[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
