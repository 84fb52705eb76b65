"""One MoE layer's routed experts, forward and backward with expert LoRA: kt_trl's engine against
the machine's ceilings, plain PyTorch on the CPU and (when given) the upstream kt-kernel SFT operator,
all measured in the same run.

    python benchmarks/moe_layer.py [--shapes qwen3,dsv3,tiny] [--tokens 512,2048,8192] [--threads N]
                                   [--kt-reference DIR] [--json FILE]

Per shape and T it prints forward / backward ms (best of --iters), TFLOPS (6·T·k·H·I FLOP per
direction, the convention of kt-kernel's benchmark), expert-weight GB/s (every expert's weights
are read once per direction), the fraction of the measured AMX tile peak (register-resident, and
the practical one with the kernel's tile loads from L1) and DRAM bandwidth, and the ratios against
plain PyTorch and kt-kernel.

Per shape and T it also gives a per-stage roofline (a `stage_roofline` record, and one line on
stderr naming the stage with the most time above its floor): each profiled engine stage's
modelled DRAM bytes and matrix FLOPs (`stage_costs`), the rates its measured time reaches, and,
with the ceilings, its fractions of the DRAM read bandwidth and the AMX tile peak.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kt_trl._native import configure
from kt_trl._native.ops import profile_read
from kt_trl.engine import ExpertEngine, ExpertLoRA
from kt_trl.reference import routed_experts_reference

SHAPES = {  # name: (E, H, I, k, LoRA rank)
    "qwen3": (128, 2048, 768, 8, 16),
    "dsv3": (256, 7168, 2048, 8, 16),
    "tiny": (8, 256, 128, 2, 4),   # a smoke run: `--shapes tiny --tokens 64 --iters 1 --no-ceilings`
}
HERE = Path(__file__).resolve().parent


def emit(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def best_ms(fn, iters: int) -> tuple[float, float]:
    fn()   # warm-up (first-touch of the workspace)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] * 1e3, times[len(times) // 2] * 1e3


def machine_ceilings(threads: int) -> dict:
    """AMX tile peak (register-resident, and with its tile loads from L1), DRAM read bandwidth
    (native microbenchmarks) and torch's BF16 GEMM."""
    out: dict = {}
    exe = Path(tempfile.gettempdir()) / "kt_trl_ceilings"
    cxx = shutil.which("g++")
    if cxx:
        flags = ["-O2", "-std=c++17", "-pthread", "-mamx-tile", "-mamx-bf16", "-mavx512f"]
        subprocess.run([cxx, *flags, str(HERE / "ceilings.cpp"), "-o", str(exe)], check=True)
        for mode, arg in (("amx", "0.5"), ("read", "4")):
            run = subprocess.run([str(exe), mode, str(threads), arg], capture_output=True, text=True)
            if run.returncode == 0:
                out.update(json.loads(run.stdout))
    a = torch.randn(4096, 4096).bfloat16()
    torch.matmul(a, a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, a)
    out["torch_bf16_gemm_tflops"] = round(3 * 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e12, 3)
    out.pop("sink", None)
    return out


def random_layer(E: int, H: int, I: int, pool: int = 4):
    """Experts tiled from `pool` random ones (randn over tens of GB is slow; values don't affect speed)."""
    gen = torch.Generator().manual_seed(0)
    gu = [(torch.randn(2 * I, H, generator=gen) * H ** -0.5).bfloat16() for _ in range(pool)]
    dn = [(torch.randn(H, I, generator=gen) * I ** -0.5).bfloat16() for _ in range(pool)]
    return gu, dn


def lora(E: int, out_f: int, in_f: int, r: int) -> ExpertLoRA:
    g = torch.Generator().manual_seed(1)
    A = torch.randn(E, r, in_f, generator=g) * in_f ** -0.5
    B = (torch.randn(out_f, r * E, generator=g) * 0.01).view(out_f, r, E).permute(2, 0, 1)
    return ExpertLoRA(A, B, 2.0)


def routing(T: int, E: int, k: int):
    g = torch.Generator().manual_seed(2)
    w, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    return ids.contiguous(), (w / w.sum(-1, keepdim=True)).contiguous()


def bench_engine(engine, T, E, H, k, lgu, ld, iters):
    ids, w = routing(T, E, k)
    x = torch.randn(T, H).bfloat16()
    dy = torch.randn(T, H).bfloat16()
    state = {}

    def fwd():
        state["saved"] = engine.forward(x, ids, w, lora_gate_up=lgu, lora_down=ld)[1]

    def bwd():
        engine.backward(dy, x, ids, w, state["saved"], lora_gate_up=lgu, lora_down=ld)

    profile_read(reset=True)
    f = best_ms(fwd, iters)
    b = best_ms(bwd, iters)
    stages = {name: round(ms / (iters + 1), 2) for name, ms in profile_read(reset=True).items() if ms > 0}
    return f, b, stages


def bench_torch(gate_up, down, T, E, H, k, lgu, ld, iters):
    ids, w = routing(T, E, k)
    x = torch.randn(T, H).bfloat16().requires_grad_()
    A1, B1 = lgu.A.bfloat16().requires_grad_(), lgu.B.bfloat16().requires_grad_()
    A2, B2 = ld.A.bfloat16().requires_grad_(), ld.B.bfloat16().requires_grad_()

    def step():
        y = routed_experts_reference(x, ids, w, gate_up, down, lora_gate_up=(A1, B1, lgu.scale),
                                     lora_down=(A2, B2, ld.scale), dtype=torch.bfloat16)
        y.backward(torch.ones_like(y))

    return best_ms(step, max(1, iters - 1))[0]


def kt_reference(directory: str, threads: int, tokens: list[int], shapes: list[str]) -> list[dict]:
    env = dict(os.environ, ANCHOR_THREADS=str(threads), ANCHOR_T=",".join(map(str, tokens)),
               ANCHOR_DSV3="1" if "dsv3" in shapes else "0", KT_KERNEL_CPU_VARIANT="amx")
    env["PYTHONPATH"] = os.path.join(directory, "site") + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run([sys.executable, os.path.join(directory, "kt_sft_op.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    records = []
    for line in run.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    if run.returncode != 0:
        records.append({"kind": "error", "stderr": run.stderr[-1500:]})
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="qwen3,dsv3")
    ap.add_argument("--tokens", default="512,2048,8192")
    ap.add_argument("--threads", type=int, default=0, help="engine threads (0 = physical cores)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--torch-max-tokens", type=int, default=8192, help="skip plain PyTorch above this T")
    ap.add_argument("--kt-reference", default=None, help="directory with kt_sft_op.py (upstream operator)")
    ap.add_argument("--lora-rank", type=int, default=16, help="expert LoRA rank on gate_up and down (0 = none)")
    ap.add_argument("--json", default=None, help="also write all records to this file")
    ap.add_argument("--no-ceilings", action="store_true",
                    help="skip the machine ceilings (minutes on a CPU without AMX or native BF16 GEMMs)")
    args = ap.parse_args()
    shapes, tokens = args.shapes.split(","), [int(t) for t in args.tokens.split(",")]
    records: list = []
    info = configure(threads=args.threads or None)
    threads = info["threads"]
    torch.set_num_threads(threads)
    emit({"kind": "runtime", **info, "torch_threads": torch.get_num_threads()}, records)
    ceil = {} if args.no_ceilings else machine_ceilings(threads)
    emit({"kind": "ceilings", **ceil}, records)
    kt = kt_reference(args.kt_reference, threads, tokens, shapes) if args.kt_reference else []
    for r in kt:
        emit({"kind": "kt_kernel", **{k: v for k, v in r.items() if k != "kind"}, "record": r.get("kind")}, records)
    kt_step = {(r.get("shape"), r.get("T")): r for r in kt if r.get("kind") == "result"}

    for name in shapes:
        E, H, I, k, _ = SHAPES[name]
        r = args.lora_rank
        pool_gu, pool_dn = random_layer(E, H, I)
        t0 = time.perf_counter()
        engine = ExpertEngine.from_experts(E, H, I, ((pool_gu[e % 4], pool_dn[e % 4]) for e in range(E)))
        weight_bytes = 3 * E * H * I * 2
        emit({"kind": "layer", "shape": name, "E": E, "H": H, "I": I, "k": k, "r": r,
              "weights_gb": round(weight_bytes / 1e9, 3), "packed_gb": round(engine.packed_bytes / 1e9, 3),
              "pack_s": round(time.perf_counter() - t0, 2)}, records)
        lgu, ld = (lora(E, 2 * I, H, r), lora(E, H, I, r)) if r else (None, None)
        full = None
        for T in tokens:
            (f_ms, f_med), (b_ms, b_med), stages = bench_engine(engine, T, E, H, k, lgu, ld, args.iters)
            flops = 6 * T * k * H * I
            rec = {"kind": "result", "shape": name, "T": T, "threads": threads,
                   "fwd_ms": round(f_ms, 2), "bwd_ms": round(b_ms, 2), "step_ms": round(f_ms + b_ms, 2),
                   "fwd_ms_med": round(f_med, 2), "bwd_ms_med": round(b_med, 2),
                   "fwd_tflops": round(flops / f_ms / 1e9, 3), "bwd_tflops": round(flops / b_ms / 1e9, 3),
                   "fwd_weight_gbs": round(weight_bytes / f_ms / 1e6, 1),
                   "bwd_weight_gbs": round(weight_bytes / b_ms / 1e6, 1)}
            if "dram_read_gbs" in ceil:
                floor_ms = 2 * weight_bytes / (ceil["dram_read_gbs"] * 1e6)
                rec["dram_floor_ms"] = round(floor_ms, 2)
                rec["step_over_dram_floor"] = round((f_ms + b_ms) / floor_ms, 2)
            if "amx_peak_tflops" in ceil:
                rec["fraction_amx_peak"] = round(2 * flops / ((f_ms + b_ms) * 1e9) / ceil["amx_peak_tflops"], 3)
            if "amx_l1_tflops" in ceil:
                rec["fraction_amx_l1"] = round(2 * flops / ((f_ms + b_ms) * 1e9) / ceil["amx_l1_tflops"], 3)
            if "torch_bf16_gemm_tflops" in ceil:
                rec["fraction_torch_gemm"] = round(
                    2 * flops / ((f_ms + b_ms) * 1e9) / ceil["torch_bf16_gemm_tflops"], 3)
            if T <= args.torch_max_tokens and name == "qwen3" and r:
                if full is None:
                    full = (torch.stack([pool_gu[e % 4] for e in range(E)]), torch.stack([pool_dn[e % 4] for e in range(E)]))
                t_ms = bench_torch(*full, T, E, H, k, lgu, ld, args.iters)
                rec["torch_step_ms"] = round(t_ms, 1)
                rec["speedup_vs_torch"] = round(t_ms / (f_ms + b_ms), 2)
            ref = kt_step.get(({"qwen3": "qwen3_30b_a3b", "dsv3": "deepseek_v3"}.get(name, name), T)) or \
                next((v for (s, t), v in kt_step.items() if t == T and s and name[:4] in s.lower().replace("-", "")), None)
            if ref and r == 16:
                rec["kt_kernel_step_ms"] = ref["step_ms"]
                rec["speedup_vs_kt_kernel"] = round(ref["step_ms"] / (f_ms + b_ms), 2)
            emit(rec, records)
            emit({"kind": "stages_ms", "shape": name, "T": T, **stages}, records)
        del engine, full
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in records) + "\n")


if __name__ == "__main__":
    main()
