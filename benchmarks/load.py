"""Loading a real-size MoE checkpoint: plain `from_pretrained` + `prepare_model` against `kt_trl.load_model`.

    python benchmarks/load.py [--layers 2] [--dir DIR] [--keep] [--reuse] [--json FILE]
        [--hidden 2048] [--experts 128] [--intermediate 768] [--vocab 151936] [--gpu-experts none]

Writes a Qwen3-30B-A3B-shaped BF16 checkpoint of `--layers` decoder layers (H 2048, E 128, I 768,
top-8; one shard per layer plus one for the embeddings, per-expert keys as transformers saves them)
to `--dir` (a temporary directory by default, removed afterwards unless `--keep`). Then measures:

- `disk` (before and after the loads; the goal uses their mean): the read bandwidth of one expert
  shard read cold (its page cache dropped with `POSIX_FADV_DONTNEED` after `sync`), and the
  first-touch bandwidth of 1 GB of fresh anonymous memory (what the packed copy costs to fault in);
- `reads`: every expert read cold the way the loader reads them (expert by expert, as many shards at
  once as it streams layers), through the page cache and with O_DIRECT, nothing packed: whether the
  loader's access pattern or its packing is what keeps it from the disk's bandwidth;
- `load` per way, each in a fresh subprocess (the model's code imported and the native library
  loaded before the clock starts) with the checkpoint's page cache dropped: seconds, peak host
  memory over the process before loading (VmHWM delta), packed bytes, checkpoint and expert GB/s
  and the experts' ratio to the disk bandwidth (non-expert tensors stay views of the mapped files
  both ways, read when first used, so the expert bytes are what a load reads);
- `summary`: the goals (peak ≤ packed + one layer + 1.5 GB; expert throughput ≥ 0.8 × disk).

`--gpu-experts` (default `none`: every expert in the engine) is `KTConfig.gpu_experts` for both ways:
with `auto` or a number, the layers kept on the GPU are read there by `load_model` and stay dense in
host memory after `from_pretrained` + `prepare_model` (the trainer moves them later); `gpu_layers`
says how many.

Every record is a JSON line on stdout.
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

POOL = 4  # distinct random experts per layer, tiled over all E (the bytes on disk are what counts)


def emit(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def model_config(opts):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=opts.vocab, hidden_size=opts.hidden, num_hidden_layers=opts.layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=opts.intermediate,
        num_experts=opts.experts, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
        max_position_embeddings=4096, dtype="bfloat16",
    )


def random_like(shape, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).bfloat16()


def layer_tensors(meta, prefix: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random BF16 values for the parameters under `prefix`, the fused experts tiled from a small pool."""
    out = {}
    for name, param in meta.named_parameters():
        if not name.startswith(prefix):
            continue
        if param.dim() == 3:  # fused experts [E, ., .]
            pool = random_like((POOL, *param.shape[1:]), generator)
            out[name] = pool.repeat((param.shape[0] + POOL - 1) // POOL, 1, 1)[: param.shape[0]].contiguous()
        elif name.endswith("norm.weight"):
            out[name] = torch.ones(param.shape, dtype=torch.bfloat16)
        else:
            out[name] = random_like(param.shape, generator)
    return out


def write_checkpoint(opts, directory: str) -> dict:
    """The checkpoint, shard by shard, under the names `save_pretrained` writes (per-expert keys)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    config = model_config(opts)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    prefixes = [f"model.layers.{i}." for i in range(opts.layers)] + ["model.embed_tokens.", "model.norm.", "lm_head."]
    groups = [[p] for p in prefixes[: opts.layers]] + [prefixes[opts.layers:]]
    weight_map, total = {}, 0
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for prefix in group:
            tensors.update(layer_tensors(meta, prefix, generator))
        tensors = {k: v.contiguous() for k, v in revert_weight_conversion(meta, tensors).items()}
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as index:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, index)
    config.save_pretrained(directory)
    expert_bytes = opts.layers * opts.experts * 3 * opts.hidden * opts.intermediate * 2
    return {"checkpoint_bytes": total, "expert_bytes": expert_bytes, "shards": len(groups)}


def read_sizes(opts, directory: str) -> dict:
    """`write_checkpoint`'s sizes for a checkpoint it wrote before (`--reuse`)."""
    with open(os.path.join(directory, "model.safetensors.index.json")) as index:
        meta = json.load(index)
    return {"checkpoint_bytes": meta["metadata"]["total_size"], "shards": len(set(meta["weight_map"].values())),
            "expert_bytes": opts.layers * opts.experts * 3 * opts.hidden * opts.intermediate * 2}


def drop_page_cache(directory: str) -> None:
    os.sync()  # dirty pages are not dropped
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_bandwidth(directory: str) -> dict:
    """Cold read of the first (expert) shard, and first-touch bandwidth of 1 GB of fresh memory."""
    drop_page_cache(directory)
    path = os.path.join(directory, min(n for n in os.listdir(directory) if n.startswith("model-00001-of-")))
    buffer = torch.empty(64 << 20, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    fd = os.open(path, os.O_RDONLY)
    start, offset = time.perf_counter(), 0
    while (n := os.preadv(fd, [view], offset)) > 0:
        offset += n
    read_s = time.perf_counter() - start
    os.close(fd)
    start = time.perf_counter()
    torch.empty(1 << 30, dtype=torch.uint8).fill_(1)
    touch_s = time.perf_counter() - start
    return {"kind": "disk", "read_bytes": offset, "read_gb_per_s": round(offset / read_s / 1e9, 3),
            "first_touch_gb_per_s": round((1 << 30) / touch_s / 1e9, 3)}


def expert_regions(path: str) -> list[tuple[int, int]]:
    """Byte ranges [start, end) of each expert's tensors in one shard, by expert id (the loader's order)."""
    import re

    from kt_trl.checkpoint_keys import _read_header

    regions: dict[int, tuple[int, int]] = {}
    for key, entry in _read_header(Path(path)).items():
        if m := re.search(r"experts\.(\d+)\.", key):
            first, last = regions.get(int(m.group(1)), (entry.start, entry.end))
            regions[int(m.group(1))] = (min(first, entry.start), max(last, entry.end))
    return [regions[e] for e in sorted(regions)]


def pattern_reads(directory: str, threads: int) -> dict:
    """Cold reads of every expert, one thread per shard as the loader reads them (expert by expert, `threads`
    shards at once), through the page cache and with O_DIRECT: what the disk gives the loader's access
    pattern, apart from packing. `direct_gb_per_s` is None where the file system refuses O_DIRECT."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.startswith("model-"))
    shards = {p: regions for p in paths if (regions := expert_regions(p))}
    align = 4096

    def read_shard(path: str, direct: bool) -> int:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        buffer = mmap.mmap(-1, 16 << 20)  # page-aligned, as O_DIRECT needs
        view, total = memoryview(buffer), 0
        try:
            for start, end in shards[path]:
                first, last = (start // align * align, -(-end // align) * align) if direct else (start, end)
                done = 0
                while done < last - first:
                    n = os.preadv(fd, [view[:min(last - first - done, len(buffer))]], first + done)
                    if n <= 0:
                        break
                    done += n
                total += end - start
        finally:
            os.close(fd)
            view.release()
            buffer.close()
        return total

    out = {"kind": "reads", "threads": threads}
    for direct in (False, True):
        drop_page_cache(directory)
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                total = sum(pool.map(lambda p: read_shard(p, direct), shards))
        except OSError:
            out["direct_gb_per_s" if direct else "buffered_gb_per_s"] = None
            continue
        out["direct_gb_per_s" if direct else "buffered_gb_per_s"] = round(total / (time.perf_counter() - start) / 1e9, 3)
    return out


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))


def child(way: str, directory: str, gpu_experts: str) -> None:
    """One load in this (fresh) process; prints one JSON line."""
    import transformers

    from kt_trl import KTConfig, load_model
    from kt_trl.engine import ExpertEngine
    from kt_trl.placement import training_device
    from kt_trl.prepare import prepare_model

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # Before the clock and the memory baseline: the native library, and the imports of the model's code.
    ExpertEngine(torch.zeros(1, 32, 32), torch.zeros(1, 32, 16))
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(directory))
    config = KTConfig(freeze_experts=True, gpu_experts=int(gpu_experts) if gpu_experts.isdigit() else gpu_experts)
    if torch.cuda.is_available():   # the CUDA context's host memory is no expert
        torch.cuda.mem_get_info()
    before = vm_hwm_bytes()
    start = time.perf_counter()
    if way == "plain":
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    else:
        model = load_model(directory, dtype=torch.bfloat16, kt_config=config)
    report = prepare_model(model, config, device=training_device())
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_delta_bytes": vm_hwm_bytes() - before,
                      "packed_bytes": report.packed_bytes, "gpu_layers": len(report.gpu_layers)}))


def run_child(way: str, directory: str, gpu_experts: str) -> dict:
    drop_page_cache(directory)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", way, "--dir", directory,
                          "--gpu-experts", gpu_experts],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(opts, directory: str, records: list) -> None:
    from kt_trl.expert_streaming import stream_workers

    sizes = read_sizes(opts, directory) if opts.reuse else write_checkpoint(opts, directory)
    emit({"kind": "checkpoint", "layers": opts.layers, "hidden": opts.hidden, "experts": opts.experts,
          "intermediate": opts.intermediate, "vocab": opts.vocab, **sizes}, records)
    disks = [disk_bandwidth(directory)]
    emit(disks[0], records)
    emit(pattern_reads(directory, stream_workers(opts.layers)), records)  # as many threads as the loader
    results = {way: run_child(way, directory, opts.gpu_experts) for way in ("plain", "kt")}
    disks.append(disk_bandwidth(directory))  # the disk's speed drifts: the mean of before and after
    emit(disks[1], records)
    disk_gb_per_s = sum(d["read_gb_per_s"] for d in disks) / len(disks)
    loads = {way: load_record(way, result, sizes, disk_gb_per_s) for way, result in results.items()}
    for record in loads.values():
        emit(record, records)
    kt = loads["kt"]
    budget = (kt["packed_gb"] * 1e9 + sizes["expert_bytes"] // opts.layers + 1.5e9) / 1e9
    emit({"kind": "summary", "speedup_vs_plain": round(loads["plain"]["seconds"] / kt["seconds"], 3),
          "peak_saved_gb": round(loads["plain"]["peak_delta_gb"] - kt["peak_delta_gb"], 3),
          "disk_read_gb_per_s": round(disk_gb_per_s, 3),
          "goals": {f"peak {kt['peak_delta_gb']} GB <= packed + one layer + 1.5 GB = {budget:.3f} GB":
                    kt["peak_delta_gb"] <= budget,
                    f"expert throughput {kt['expert_gb_per_s']} GB/s >= 0.8 x disk {disk_gb_per_s:.3f} GB/s":
                    kt["expert_ratio_to_disk"] >= 0.8}}, records)


def load_record(way: str, result: dict, sizes: dict, disk_gb_per_s: float) -> dict:
    """One way's numbers. Both ways leave the non-expert tensors as views of the mapped files (read when first
    used), so the expert bytes, which both read and pack during the load, are the honest throughput."""
    seconds = result["seconds"]
    expert_gb_per_s = sizes["expert_bytes"] / seconds / 1e9
    return {"kind": "load", "way": "from_pretrained + prepare_model" if way == "plain" else "load_model",
            "seconds": round(seconds, 3), "peak_delta_gb": round(result["peak_delta_bytes"] / 1e9, 3),
            "packed_gb": round(result["packed_bytes"] / 1e9, 3), "gpu_layers": result["gpu_layers"],
            "peak_over_packed_gb": round((result["peak_delta_bytes"] - result["packed_bytes"]) / 1e9, 3),
            "checkpoint_gb": round(sizes["checkpoint_bytes"] / 1e9, 3),
            "gb_per_s": round(sizes["checkpoint_bytes"] / seconds / 1e9, 3),
            "expert_gb_per_s": round(expert_gb_per_s, 3),
            "expert_ratio_to_disk": round(expert_gb_per_s / disk_gb_per_s, 3)}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("layers", 2), ("hidden", 2048), ("experts", 128), ("intermediate", 768), ("vocab", 151936)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint directory")
    ap.add_argument("--reuse", action="store_true", help="load the checkpoint --dir holds from an earlier --keep run")
    ap.add_argument("--json", default=None, help="also write all records to this file")
    ap.add_argument("--gpu-experts", default="none", help="KTConfig.gpu_experts for both ways: none, auto or a number")
    ap.add_argument("--child", choices=("plain", "kt"), default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    opts = parse(argv)
    if opts.child:
        child(opts.child, opts.dir, opts.gpu_experts)
        return []
    directory = opts.dir or tempfile.mkdtemp(prefix="kt_trl_load_")
    os.makedirs(directory, exist_ok=True)
    records: list[dict] = []
    try:
        measure(opts, directory, records)
    finally:
        if not opts.keep:
            shutil.rmtree(directory, ignore_errors=True)
    if opts.json:
        with open(opts.json, "w") as sink:
            sink.writelines(json.dumps(r) + "\n" for r in records)
    return records


if __name__ == "__main__":
    main()
