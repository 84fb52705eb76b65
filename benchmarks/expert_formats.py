"""BF16, FP8 and INT8 frozen experts in one process: the same layer, routing and LoRA, the formats'
forward + backward steps interleaved and repeated, medians and spread.

    python benchmarks/expert_formats.py [--shapes qwen3,dsv3] [--tokens 512,2048] [--reps 10]
                                        [--threads N] [--isa auto] [--no-ceilings] [--json FILE]

Per shape, T and format it prints the step's median ms (min-max over --reps), tokens/s, the
expert-weight bytes the step streams per second (each format's own packed bytes, read twice: forward
and backward) as a fraction of the measured DRAM read bandwidth, the step against the BF16 floor
(two sweeps of the BF16 weights), and the ratio against the BF16 step of the same repetitions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import SHAPES, lora, machine_ceilings, random_layer, routing  # noqa: E402

from kt_trl._native import configure  # noqa: E402
from kt_trl._native.ops import profile_read  # noqa: E402
from kt_trl.engine import ExpertEngine  # noqa: E402
from kt_trl.formats import FP8_BLOCK_K, quantize  # noqa: E402

FORMATS = ("bf16", "fp8", "int8")


def engines(E: int, H: int, I: int) -> dict[str, ExpertEngine]:
    """One engine per format over the same experts (tiled from 4 random ones; values don't affect speed)."""
    pool_gu, pool_dn = random_layer(E, H, I)
    out = {}
    for fmt in FORMATS:
        if fmt == "bf16":
            pool = list(zip(pool_gu, pool_dn))
        else:
            block_k = FP8_BLOCK_K if fmt == "fp8" else 0
            pool = [(quantize(g, fmt, block_k), quantize(d, fmt, block_k)) for g, d in zip(pool_gu, pool_dn)]
        t0 = time.perf_counter()
        out[fmt] = ExpertEngine.from_experts(E, H, I, (pool[e % 4] for e in range(E)), format=fmt)
        print(json.dumps({"kind": "engine", "format": fmt, "packed_gb": round(out[fmt].packed_bytes / 1e9, 3),
                          "pack_s": round(time.perf_counter() - t0, 1)}), flush=True)
    return out


def step_fn(engine: ExpertEngine, x, ids, w, dy, lgu, ld):
    def step():
        y, saved = engine.forward(x, ids, w, lora_gate_up=lgu, lora_down=ld)
        engine.backward(dy, x, ids, w, saved, lora_gate_up=lgu, lora_down=ld)
    return step


def interleaved(steps: dict, reps: int) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """ms per step of each variant, the variants taking turns (and rotating who goes first), and each
    variant's mean ms per engine stage."""
    for fn in steps.values():
        fn()   # warm-up: first touch of the workspace
    times = {name: [] for name in steps}
    stages = {name: {} for name in steps}
    names = list(steps)
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            profile_read(reset=True)
            t0 = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
            for stage, ms in profile_read(reset=True).items():
                stages[name][stage] = stages[name].get(stage, 0.0) + ms / reps
    return times, stages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen3,dsv3")
    ap.add_argument("--tokens", default="512,2048")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--isa", default="auto")
    ap.add_argument("--no-ceilings", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    records = []

    def emit(record):
        records.append(record)
        print(json.dumps(record), flush=True)

    info = configure(isa=args.isa, threads=args.threads or None)
    emit({"kind": "runtime", **info})
    ceil = {} if args.no_ceilings else machine_ceilings(info["threads"])
    emit({"kind": "ceilings", **ceil})
    for name in args.shapes.split(","):
        E, H, I, k, r = SHAPES[name]
        built = engines(E, H, I)
        lgu, ld = lora(E, 2 * I, H, r), lora(E, H, I, r)
        bf16_bytes = built["bf16"].packed_bytes
        for T in (int(t) for t in args.tokens.split(",")):
            ids, w = routing(T, E, k)
            x, dy = torch.randn(T, H).bfloat16(), torch.randn(T, H).bfloat16()
            times, stages = interleaved({f: step_fn(e, x, ids, w, dy, lgu, ld) for f, e in built.items()}, args.reps)
            base = statistics.median(times["bf16"])
            for fmt, ms in times.items():
                med = statistics.median(ms)
                rec = {"kind": "result", "shape": name, "T": T, "format": fmt, "step_ms_median": round(med, 2),
                       "step_ms_min": round(min(ms), 2), "step_ms_max": round(max(ms), 2), "reps": len(ms),
                       "tokens_per_s": round(T / med * 1e3, 1), "vs_bf16": round(med / base, 3),
                       "weight_gbs": round(2 * built[fmt].packed_bytes / med / 1e6, 1)}
                if "dram_read_gbs" in ceil:
                    rec["fraction_dram"] = round(rec["weight_gbs"] / ceil["dram_read_gbs"], 3)
                    rec["step_over_bf16_dram_floor"] = round(med / (2 * bf16_bytes / (ceil["dram_read_gbs"] * 1e6)), 2)
                emit(rec)
                emit({"kind": "stages_ms", "shape": name, "T": T, "format": fmt,
                      **{k: round(v, 2) for k, v in stages[fmt].items() if v > 0}})
        del built
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in records) + "\n")


if __name__ == "__main__":
    main()
