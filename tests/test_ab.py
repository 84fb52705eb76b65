"""`benchmarks/ab.py`: the A/B summary (medians, ranges, ratio, whether the ranges separate) and one real run."""

from __future__ import annotations

import pytest

from tests.helpers import benchmark_module


@pytest.fixture(scope="module")
def ab():
    return benchmark_module("ab")


def records(step, gate_up):
    return [{"kind": "result", "shape": "qwen3", "T": 512, "step_ms": step, "fwd_ms": step / 2, "bwd_ms": step / 2},
            {"kind": "stages_ms", "shape": "qwen3", "T": 512, "fwd_gate_up": gate_up}]


def test_summary_reports_medians_ranges_and_separation(ab, monkeypatch, tmp_path):
    fake = {"A": iter([records(50.0, 10.0), records(52.0, 11.0), records(54.0, 10.5)]),
            "B": iter([records(40.0, 10.2), records(41.0, 10.8), records(39.0, 10.4)])}
    monkeypatch.setattr(ab, "run_once", lambda site, source, args: next(fake[site]))
    lines = ab.main(["--a", "A", "--b", "B", "--rounds", "3", "--json", str(tmp_path / "ab.jsonl"), "--", "--iters", "1"])
    by = {line["what"]: line for line in lines}
    assert by["step_ms"]["a_ms"] == 52.0 and by["step_ms"]["b_ms"] == 40.0 and by["step_ms"]["b_over_a"] == 0.769
    assert by["step_ms"]["separated"] and by["step_ms"]["a_range"] == [50.0, 54.0]
    assert not by["fwd_gate_up"]["separated"]  # 10.0-11.0 against 10.2-10.8
    written = (tmp_path / "ab.jsonl").read_text().splitlines()
    assert len(written) == 6 * 2 + len(lines)  # two records per run, then the summary


def test_each_variant_imports_its_own_directory(ab, tmp_path):
    # a stand-in build that only prints one record: it must be the one imported, even where the
    # package is installed editable (whose import hook answers before PYTHONPATH)
    fake = tmp_path / "site" / "kt_trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'import json, sys\nprint(json.dumps({"kind": "result", "shape": "stand-in", "T": 1, '
        '"step_ms": 1.0, "fwd_ms": 0.5, "bwd_ms": 0.5}))\nsys.exit(0)\n')
    got = ab.run_once(str(tmp_path / "site"), ab.HERE.parent, [])
    assert [r["shape"] for r in got] == ["stand-in"]


def test_one_real_round_of_the_same_build(ab):
    # the installed build against itself: every line is there, the ratio near 1 is not asserted (timing)
    lines = ab.main(["--a", "", "--b", "", "--rounds", "1", "--",
                     "--shapes", "tiny", "--tokens", "64", "--iters", "1", "--no-ceilings"])
    whats = {line["what"] for line in lines}
    assert {"step_ms", "fwd_ms", "bwd_ms", "fwd_gate_up", "bwd_gate_up_t"} <= whats
    assert all(line["a_ms"] > 0 and line["b_ms"] > 0 for line in lines if line["what"] == "step_ms")
