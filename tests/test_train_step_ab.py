"""`benchmarks/train_step_ab.py`: variants of train_step.py alternating, their tokens/s and ratios."""

from __future__ import annotations

import json

import pytest

from tests.helpers import benchmark_module
from tests.test_train_step import TINY


@pytest.fixture(scope="module")
def ab():
    return benchmark_module("train_step_ab")


def test_two_variants_alternate_and_get_a_ratio(ab, tmp_path):
    out = tmp_path / "ab.jsonl"
    lines = ab.main(["--variant", "kept:", "--variant", "recompute:--max-kept-activations-gb 0",
                     "--env", "recompute:KT_TRL_TEST_MARK=1", "--rounds", "1", "--json", str(out), "--", *TINY])
    summaries = {line["variant"]: line for line in lines if line["kind"] == "summary"}
    assert summaries.keys() == {"kept", "recompute"}
    for line in summaries.values():
        assert line["steps"] == 1 and line["min"] <= line["tokens_per_s"] <= line["max"] and line["engine_s"] > 0
    (ratio,) = [line for line in lines if line["kind"] == "ratio"]
    expected = summaries["recompute"]["tokens_per_s"] / summaries["kept"]["tokens_per_s"]
    assert ratio["to"] == "kept" and ratio["median"] == pytest.approx(expected, rel=1e-2)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    steps = [r for r in records if r.get("kind") == "step"]
    # Each variant ran with its own arguments: without kept activations every layer is recomputed.
    assert {r["variant"]: r["expert_calls"] for r in steps} == {"kept": [2, 2, 2], "recompute": [4, 0, 2]}


@pytest.mark.parametrize("argv, message", [
    (["--variant", "a:"], "at least two"),
    (["--variant", "a:", "--variant", "a:--steps 1"], "new NAME"),
    (["--variant", "a:", "--variant", "b:", "--env", "c:X=1"], "NAME:KEY=VALUE"),
])
def test_bad_variants_are_refused_with_what_to_give(ab, argv, message):
    with pytest.raises(SystemExit, match=message):
        ab.main(argv)


def test_a_failing_variant_is_reported_and_counted_as_no_steps(ab, capsys):
    lines = ab.main(["--variant", "ok:", "--variant", "bad:--layers 0", "--rounds", "1", "--", *TINY])
    assert "round 1 bad failed" in capsys.readouterr().out
    assert {line["variant"]: line["steps"] for line in lines if line["kind"] == "summary"} == {"ok": 1, "bad": 0}
    assert [line["median"] for line in lines if line["kind"] == "ratio"] == [None]
