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


def best_ms(fn, iters: int, after_warmup=None) -> tuple[float, float]:
    fn()   # warm-up (first-touch of the workspace)
    if after_warmup:
        after_warmup()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[0] * 1e3, times[len(times) // 2] * 1e3


def machine_ceilings(threads: int) -> dict:
    """AMX tile peak (register-resident, and with its tile loads from L1), the AVX512-BF16 peak, DRAM read bandwidth
    (native microbenchmarks) and torch's BF16 GEMM."""
    out: dict = {}
    exe = Path(tempfile.gettempdir()) / "kt_trl_ceilings"
    cxx = shutil.which("g++")
    if cxx:
        flags = ["-O2", "-std=c++17", "-pthread", "-mamx-tile", "-mamx-bf16", "-mavx512f"]
        subprocess.run([cxx, *flags, str(HERE / "ceilings.cpp"), "-o", str(exe)], check=True)
        for mode, arg in (("amx", "0.5"), ("bf16dot", "0.5"), ("read", "4")):
            run = subprocess.run([str(exe), mode, str(threads), arg], capture_output=True, text=True)
            if run.returncode == 0:
                out.update(json.loads(run.stdout))
    a = torch.randn(4096, 4096).bfloat16()
    torch.matmul(a, a)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.matmul(a, a)
    out["torch_bf16_gemm_tflops"] = round(3 * 2 * 4096 ** 3 / (time.perf_counter() - t0) / 1e12, 3)
    if "dram_read_gbs" not in out:   # the native read mode needs AVX-512: a torch reduction instead
        out["dram_read_gbs_torch"] = torch_read_gbs()
    out.pop("sink", None)
    return out


def torch_read_gbs(gib: int = 1) -> float:
    """DRAM read bandwidth as torch's sum of a `gib` GiB FP32 buffer sees it (a lower bound of the
    native streaming read: the per-stage roofline's fallback on CPUs without AVX-512)."""
    a = torch.ones(gib << 28)
    a.sum()
    t0 = time.perf_counter()
    for _ in range(3):
        a.sum()
    return round(3 * a.numel() * 4 / (time.perf_counter() - t0) / 1e9, 1)


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

    # The profile sums every call, best_ms's warm-ups included: stages_ms is ms per step (one
    # forward and one backward) over all iters + 1 of each, warm-ups in (as in earlier results);
    # the roofline's `warm` is per step over the timed iters only: a warm-up's first touch of the
    # workspace is no stage's steady cost.
    snaps = []   # cumulative stage ms after the fwd warm-up, before and after the bwd warm-up

    def snap():
        snaps.append(profile_read())

    profile_read(reset=True)
    f = best_ms(fwd, iters, after_warmup=snap)
    snap()
    b = best_ms(bwd, iters, after_warmup=snap)
    total = profile_read(reset=True)
    stages = {name: round(ms / (iters + 1), 2) for name, ms in total.items() if ms > 0}
    warm = {name: (ms - snaps[0][name] - (snaps[2][name] - snaps[1][name])) / iters for name, ms in total.items()}
    return f, b, stages, {name: ms for name, ms in warm.items() if ms > 0}


# Per-stage roofline. For each stage (native/src/moe_forward.cpp, moe_backward.cpp) the model
# counts its compulsory DRAM traffic, every buffer it reads or writes once, and its matrix FLOPs.
# Rows gathered by route (x, dY) count once per route: a token's k routes go to different experts'
# chunks, far apart in time. Only the experts with tokens have their weights read.
# Buffers passed between stages (Xs, GU, Hs, D, ...) count in both stages; at small T they may stay
# in L3, and any weights that fit in the caches (tiny) stay there across calls, so achieved GB/s
# can pass the ceiling. Reads and writes both count against the read bandwidth: writes cost at least
# as much (read-for-ownership), so the floor is optimistic. Row padding (Hp, Ip) is left out.
# FLOPs are 2 x the multiply-adds of the BF16 expert GEMMs (AMX) and of the FP32 LoRA products
# (vector units, counted against the same AMX peak: they are ~r/H of a GEMM stage's FLOPs);
# the elementwise work of act and combine is not counted.
BF16, F32 = 2, 4


def active_experts(T: int, E: int, k: int) -> int:
    """Experts with at least one route under `routing(T, E, k)`: the ones whose weights are read."""
    return int(torch.unique(routing(T, E, k)[0]).numel())


def stage_costs(E: int, H: int, I: int, k: int, r: int, T: int, active: int) -> dict[str, tuple[int, int]]:
    """{stage: (DRAM bytes, FLOPs)} of one forward and one backward with rank-r LoRA on both projections."""
    N = T * k   # routes; random routing has no sentinel ones, so every route is a sorted row

    def rows(width: int, size: int = BF16) -> int:   # one row per route of a [N, width] buffer
        return N * width * size

    def gemm(n_out: int, n_in: int) -> int:   # FLOPs of [N, n_in] x [n_in, n_out]
        return 2 * N * n_out * n_in

    def lora_mat(width: int) -> int:   # a LoRA A [r, width] or B [width, r] of every expert with tokens
        return active * r * width * F32

    w_gu, w_d = active * 2 * I * H * BF16, active * H * I * BF16   # packed weights of the experts with tokens
    lora_b_all = E * r * (2 * I + H) * F32   # both Bs of all E experts
    lr = rows(r, F32)                        # a [N, r] FP32 LoRA row buffer (LX, LH, TY, TG)
    return {
        # Each call (fwd and bwd) reads ids int64 + weights FP32, writes route, row_of int64 + weight FP32.
        "plan": (2 * N * (8 + 4 + 8 + 8 + 4), 0),
        # fwd transposes both Bs (all E, read + write), bwd copies them again.
        "lora_prep": (4 * lora_b_all, 0),
        # x row per route -> Xs; LoRA LX = Xs A_gu^T (reads A_gu, writes LX).
        "fwd_gather": (2 * rows(H) + lora_mat(H) + lr, gemm(r, H)),
        # Xs, the gate_up weights, LX and Bt_gu in; GU (BF16, the saved buffer) out.
        "fwd_gate_up": (rows(H) + w_gu + lr + lora_mat(2 * I) + rows(2 * I), gemm(2 * I, H) + gemm(2 * I, r)),
        # GU in, Hs out; LoRA LH = Hs A_d^T (A_d in, LH out), LX copied to the saved buffer (in + out),
        # LH saved too (out).
        "fwd_act": (rows(2 * I) + rows(I) + lora_mat(I) + 4 * lr, gemm(r, I)),
        # Hs, the down weights, LH and Bt_d in; D [N, H] FP32 per-route rows out.
        "fwd_down": (rows(I) + w_d + lr + lora_mat(H) + rows(H, F32), gemm(H, I) + gemm(H, r)),
        # D rows and route weights in, y [T, H] BF16 out.
        "fwd_combine": (rows(H, F32) + N * F32 + T * H * BF16, 0),
        # dY row per route -> dYs; LoRA TY = dYs B_d (reads B_d, writes TY).
        "bwd_gather": (2 * rows(H) + lora_mat(H) + lr, gemm(r, H)),
        # dYs, the down weights again, TY and A_d in; G [N, I] FP32 out.
        "bwd_down_t": (rows(H) + w_d + lr + lora_mat(I) + rows(I, F32), gemm(I, H) + gemm(I, r)),
        # saved GU and G in, dGU and dw out; LoRA: B_gu, saved LX and LH, TY in, TG out, x and dYs rows
        # in again (dA_gu, dB_d), dA of both written (all E), dB accumulated per expert then stored
        # (out, in, out).
        "bwd_act": (rows(2 * I) + rows(I, F32) + rows(2 * I) + N * F32
                    + lora_mat(2 * I) + 4 * lr + (2 * rows(H) if r else 0)
                    + E * r * (H + I) * F32 + 3 * lora_b_all,
                    gemm(r, 2 * I) + gemm(2 * I, r) + gemm(r, H) + gemm(r, I) + gemm(H, r)),
        # dGU, the gate_up weights again, TG and A_gu in; DX [N, H] FP32 per-route rows out.
        "bwd_gate_up_t": (rows(2 * I) + w_gu + lr + lora_mat(H) + rows(H, F32), gemm(H, 2 * I) + gemm(H, r)),
        # DX rows in, dx [T, H] BF16 out.
        "bwd_combine": (rows(H, F32) + T * H * BF16, 0),
    }


def roofline(ms: float, nbytes: int, flops: int, dram_gbs: float | None, compute_tflops: float | None,
             compute: str = "amx") -> dict:
    """One stage: its rates and, for the ceilings given (DRAM, and the `compute` path's peak: "amx" or
    "avx512"), fractions of them; `floor_ms` is the time at the nearer ceiling (ms x the larger
    fraction), `headroom` how many times faster it could run."""
    out = {"ms": round(ms, 3), "bytes": nbytes, "flops": flops,
           "achieved_GBps": round(nbytes / ms / 1e6, 2), "achieved_TFLOPS": round(flops / ms / 1e9, 4)}
    frac = {}
    if dram_gbs:
        frac["dram"] = nbytes / ms / 1e6 / dram_gbs
    if compute_tflops:
        frac[compute] = flops / ms / 1e9 / compute_tflops
    out.update({f"frac_{name}": round(f, 4) for name, f in frac.items()})
    if frac and max(frac.values()) > 0:
        bound = max(frac, key=frac.get)
        out.update(bound=bound, headroom=round(1 / frac[bound], 2), floor_ms=round(ms * frac[bound], 3))
    return out


COMPUTE_KEY = {"amx": "_peak_tflops", "avx512": "_bf16_peak_tflops"}


def stage_roofline(name: str, T: int, shape: tuple, r: int, warm_ms: dict, ceil: dict) -> dict:
    """The `stage_roofline` record of one (shape, T) from the warm per-step stage ms."""
    E, H, I, k = shape
    active = active_experts(T, E, k)
    dram_key = next((key for key in ("dram_read_gbs", "dram_read_gbs_torch") if key in ceil), None)
    dram = ceil.get(dram_key)
    # the compute ceiling: AMX's tile peak where the host has AMX, else the AVX512-BF16 peak
    compute = next((c for c in ("amx", "avx512") if ceil.get(f"{c}{COMPUTE_KEY[c]}")), None)
    peak = ceil.get(f"{compute}{COMPUTE_KEY[compute]}") if compute else None
    rec = {"kind": "stage_roofline", "shape": name, "T": T, "routes": T * k, "active_experts": active,
           "dram_ceiling": dram_key, "dram_gbs": dram, "compute_ceiling": compute, "compute_peak_tflops": peak,
           "amx_peak_tflops": ceil.get("amx_peak_tflops")}
    costs = stage_costs(E, H, I, k, r, T, active)
    for stage, ms in warm_ms.items():
        if stage in costs:
            rec[stage] = roofline(ms, *costs[stage], dram, peak, compute or "amx")
    rec["unmodelled"] = sorted(set(warm_ms) - set(costs))   # stages added to the engine since this model
    return rec


def worst_stage_line(rec: dict) -> str:
    """The stage with the most time above its floor (its ms minus floor_ms), or without ceilings the slowest."""
    stages = {n: v for n, v in rec.items() if isinstance(v, dict)}
    head = f"{rec['shape']} T={rec['T']}:"
    if not stages:
        return f"{head} no profiled stages"
    total = sum(v["ms"] for v in stages.values())
    floored = {n: v for n, v in stages.items() if "floor_ms" in v}
    if not floored:
        n, v = max(stages.items(), key=lambda item: item[1]["ms"])
        return (f"{head} slowest stage {n} {v['ms']:.2f} ms, {v['achieved_GBps']:.1f} GB/s, "
                f"{v['achieved_TFLOPS']:.3f} TFLOPS (no ceilings, no floors); stages {total:.1f} ms")
    n, v = max(floored.items(), key=lambda item: item[1]["ms"] - item[1]["floor_ms"])
    fracs = ", ".join(f"{v[f'frac_{c}']:.2f} of {c.upper()}" for c in ("dram", "amx", "avx512") if f"frac_{c}" in v)
    floor = sum(s["floor_ms"] for s in floored.values())
    missing = [c for c, key in (("DRAM", "dram_gbs"), ("compute", "compute_peak_tflops")) if rec.get(key) is None]
    return (f"{head} worst stage {n} {v['ms']:.2f} ms, {fracs} (floor {v['floor_ms']:.2f} ms, "
            f"{v['bound'].upper()}-bound, headroom {v['headroom']:.1f}x); stages {total:.1f} ms vs floor {floor:.1f} ms"
            + "".join(f"; no {c} ceiling" for c in missing))


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
            (f_ms, f_med), (b_ms, b_med), stages, warm = bench_engine(engine, T, E, H, k, lgu, ld, args.iters)
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
            if "avx512_bf16_peak_tflops" in ceil:   # what the avx512 path can reach
                rec["fraction_avx512_bf16_peak"] = round(
                    2 * flops / ((f_ms + b_ms) * 1e9) / ceil["avx512_bf16_peak_tflops"], 3)
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
            roof = stage_roofline(name, T, (E, H, I, k), r, warm, ceil)
            emit(roof, records)
            print(worst_stage_line(roof), file=sys.stderr, flush=True)
        del engine, full
    if args.json:
        Path(args.json).write_text("\n".join(json.dumps(r) for r in records) + "\n")


if __name__ == "__main__":
    main()
