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
    monkeypatch.setattr(ab, "run_once", lambda site, source, args, script: next(fake[site]))
    lines = ab.main(["--a", "A", "--b", "B", "--rounds", "3", "--json", str(tmp_path / "ab.jsonl"), "--", "--iters", "1"])
    by = {line["what"]: line for line in lines}
    assert by["step_ms"]["a_ms"] == 52.0 and by["step_ms"]["b_ms"] == 40.0 and by["step_ms"]["b_over_a"] == 0.769
    assert by["step_ms"]["separated"] and by["step_ms"]["a_range"] == [50.0, 54.0]
    assert not by["fwd_gate_up"]["separated"]  # 10.0-11.0 against 10.2-10.8
    written = (tmp_path / "ab.jsonl").read_text().splitlines()
    assert len(written) == 6 * 2 + len(lines)  # two records per run, then the summary


def test_several_builds_against_the_first_in_rotating_order(ab, monkeypatch):
    order, steps = [], {"A": 50.0, "B": 40.0, "C": 60.0}
    sources = {}

    def run(site, source, args, script):
        order.append(site)
        sources[site] = (str(source), script)
        return records(steps[site] + len(order) * 0.01, 10.0)

    monkeypatch.setattr(ab, "run_once", run)
    lines = ab.main(["--a", "A", "--b", "B", "--build", "c=C", "--src", "c=/tree/c", "--script", "expert_formats",
                     "--rounds", "3", "--", "--reps", "1"])
    assert order == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert sources["C"] == ("/tree/c", "expert_formats") and sources["A"][1] == "expert_formats"
    step = {line["b"]: line for line in lines if line["what"] == "step_ms"}
    assert set(step) == {"b", "c"} and all(line["a"] == "a" for line in step.values())
    assert step["b"]["b_over_a"] == 0.8 and step["c"]["b_over_a"] == 1.2 and step["c"]["separated"]


def test_bad_build_arguments_are_refused(ab):
    for argv, message in ((["--build", "c"], "expected NAME=PATH"), (["--build", "b=X"], "is taken"),
                          (["--src", "d=/t"], "not given")):
        with pytest.raises(SystemExit, match=message):
            ab.main(["--a", "A", "--b", "B", *argv])


def test_formats_records_are_keyed_by_format(ab):
    got = ab.times([{"kind": "result", "shape": "qwen3", "T": 512, "format": "fp8", "step_ms_median": 30.0},
                    {"kind": "stages_ms", "shape": "qwen3", "T": 512, "format": "fp8", "fwd_gate_up": 8.0},
                    {"kind": "result", "shape": "qwen3", "T": 512, "format": "bf16", "step_ms_median": 40.0}])
    assert got == {("qwen3/fp8", 512, "step_ms"): 30.0, ("qwen3/fp8", 512, "fwd_gate_up"): 8.0,
                   ("qwen3/bf16", 512, "step_ms"): 40.0}


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


def test_one_real_round_of_the_formats_benchmark(ab):
    lines = ab.main(["--a", "", "--b", "", "--rounds", "1", "--script", "expert_formats", "--",
                     "--shapes", "tiny", "--tokens", "64", "--reps", "1", "--no-ceilings"])
    steps = {line["shape"] for line in lines if line["what"] == "step_ms"}
    assert steps == {"tiny/bf16", "tiny/fp8", "tiny/int8"}
