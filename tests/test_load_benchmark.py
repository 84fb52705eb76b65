"""`benchmarks/load.py` end to end at a tiny shape (checkpoint written, both loads in subprocesses, reads probe)."""

from __future__ import annotations

import pytest

from tests.helpers import benchmark_module

TINY = ["--layers", "2", "--hidden", "64", "--experts", "4", "--intermediate", "32", "--vocab", "256"]


@pytest.fixture(scope="module")
def load():
    return benchmark_module("load")


def test_tiny_run_measures_both_ways_and_the_reads_of_every_expert(load, tmp_path):
    records = load.main([*TINY, "--dir", str(tmp_path), "--keep"])
    kinds = [r["kind"] for r in records]
    assert kinds == ["checkpoint", "disk", "reads", "disk", "load", "load", "summary"]
    reads = records[2]
    assert reads["threads"] == 2 and reads["buffered_gb_per_s"] > 0
    assert reads["direct_gb_per_s"] is None or reads["direct_gb_per_s"] > 0
    for record in records[4:6]:
        assert record["seconds"] > 0 and record["gpu_layers"] == 0
    assert len(records[-1]["goals"]) == 2

    # The probe's regions: every expert of a layer once, gate, up and down together.
    shards = sorted(p for p in tmp_path.glob("model-*.safetensors"))
    per_shard = [load.expert_regions(str(p)) for p in shards]
    assert [len(r) for r in per_shard] == [4, 4, 0]  # one shard per layer, then the embeddings and head
    for regions in per_shard[:2]:
        assert all(end - start == 3 * 64 * 32 * 2 for start, end in regions)  # gate, up, down in BF16
        spans = sorted(regions)
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
