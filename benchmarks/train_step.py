"""Training steps of a real-size MoE model with KTSFTTrainer: where the time and the memory go.

    python benchmarks/train_step.py [--family qwen3_moe] [--layers 48] [--batch 4] [--seq 2048]
        [--steps 4] [--warmup 1] [--reference] [--threads N] [--isa auto] [--json FILE]
        [--max-kept-activations-gb GB] [--max-kept-activations-gpu-gb GB]
        [--gpu-experts auto|none|N] [--max-gpu-memory-gb GB] [--expert-format bf16|fp8|int8]
        [--hidden 2048] [--experts 128] [--intermediate 768] [--top-k 8] [--heads 32] [--kv-heads 4]
        [--head-dim 128] [--vocab 151936] [--dense-intermediate 6144]

The defaults are the Qwen3-30B-A3B shape (`--family` also takes mixtral and deepseek_v3). The model is built without a checkpoint and without
ever holding its expert weights twice: on the meta device first; then, layer by layer, a few
random experts are generated and tiled into that layer's `ExpertEngine` (`from_experts`, installed
with `kt_trl.weights.install_engine`); then everything else is materialised (bf16, random init) on
the GPU, or the CPU without one. The experts never reach the GPU. `KTSFTTrainer` then trains LoRA r 16
on attention (q, k, v, o) and on the experts (`target_parameters`), gradient checkpointing on, on
random tokens. `--gpu-experts` (default `auto`, as `KTConfig`) keeps the first layers' experts
dense on the GPU in transformers' own path, as many as `kt_trl.placement` finds room for (or N
experts' worth of whole layers), the rest in engines.

JSON lines: `runtime`, `model` (build time, packed bytes, host RSS after the build), one `step`
per optimizer step (`warmup` marks the first ones): tokens/s; the training thread's step split into
CPU expert forward, CPU expert backward (dx, dw and the expert-LoRA gradients), transfers (host memcpy into pinned buffers +
device time of the copies), GPU wait (host blocked on the GPU beyond the copies), optimizer (host
time of `optimizer.step`, the CPU AdamW over the expert LoRA included) and the rest; GPU peak
memory; host RSS against the packed experts + expert-LoRA parameters, gradients and optimizer
state, and where the kept checkpoint activations waited; the CPU roofline (tokens/s if the step
took only the engine's busy time, summed over its stages); then a `summary` over the steps after
warm-up. With
`--reference` (a shape that fits on the GPU with its experts) the same model, data and LoRA are
first trained all-on-GPU with plain PEFT `SFTTrainer` (`reference_step` records) and `parity`
compares the losses and tokens/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import tempfile
import time

import torch

# model_type: (key of the expert count, of the expert intermediate size, of top-k; fixed settings)
FAMILIES = {
    "qwen3_moe": ("num_experts", "moe_intermediate_size", "num_experts_per_tok", {"norm_topk_prob": True}),
    "mixtral": ("num_local_experts", "intermediate_size", "num_experts_per_tok", {}),
    "deepseek_v3": ("n_routed_experts", "moe_intermediate_size", "num_experts_per_tok",
                    {"first_k_dense_replace": 0, "n_group": 1, "topk_group": 1}),
}
GQA_FAMILIES = ("qwen3_moe", "mixtral")  # DeepSeek's MLA sets its own head sizes and has one KV head per head
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
POOL = 4  # distinct random experts per layer, tiled over all E (values do not change the speed)


def emit(record: dict, sink: list) -> None:
    sink.append(record)
    print(json.dumps(record), flush=True)


def model_config(opts):
    """A transformers config of `opts.family` with the shape from the command line."""
    from transformers import AutoConfig

    experts_key, inter_key, top_k_key, fixed = FAMILIES[opts.family]
    kwargs = dict(
        vocab_size=opts.vocab, hidden_size=opts.hidden, num_hidden_layers=opts.layers,
        num_attention_heads=opts.heads, intermediate_size=opts.dense_intermediate,
        tie_word_embeddings=False, max_position_embeddings=max(4096, opts.seq), **fixed,
    )
    kwargs.update({experts_key: opts.experts, inter_key: opts.intermediate, top_k_key: opts.top_k})
    if opts.family in GQA_FAMILIES:
        kwargs.update(head_dim=opts.head_dim, num_key_value_heads=opts.kv_heads)
    else:
        kwargs["num_key_value_heads"] = opts.heads
    return AutoConfig.for_model(opts.family, **kwargs)


def expert_pool(layer: int, num_experts: int, hidden: int, inter: int, std: float, seed: int):
    """`POOL` random experts `(gate_up [2I, H], down [H, I])` in bf16 for one layer, tiled to `num_experts`."""
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    pool = [((torch.randn(2 * inter, hidden, generator=generator) * std).bfloat16(),
             (torch.randn(hidden, inter, generator=generator) * std).bfloat16()) for _ in range(min(POOL, num_experts))]
    return [pool[e % len(pool)] for e in range(num_experts)]


def build_model(config, *, device: torch.device, seed: int, engines: bool, dense_layers: int = 0,
                expert_format: str = "bf16"):
    """The model with random weights: experts in `ExpertEngine`s (`engines`, but for the first
    `dense_layers` MoE layers; stored in `expert_format`, the pool quantized once) or dense on `device`."""
    from kt_trl.formats import default_block_k, quantize

    from transformers import AutoModelForCausalLM

    from kt_trl.containers import find_decoder_layers, find_moe_blocks
    from kt_trl.engine import ExpertEngine
    from kt_trl.layouts import match_layout
    from kt_trl.weights import install_engine
    from kt_trl.placement import spread

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    blocks = find_moe_blocks(find_decoder_layers(model), match_layout(model))
    dense = {b.index for b in spread(blocks, dense_layers)}   # where KTConfig(gpu_experts=...) would put them
    std = getattr(config, "initializer_range", 0.02)
    pools = {}
    for block in blocks:
        num_experts, two_inter, hidden = block.experts.gate_up_proj.shape
        experts = expert_pool(block.index, num_experts, hidden, two_inter // 2, std, seed)
        if engines and block.index not in dense:  # one layer's pool at a time: the engine is the only copy
            if expert_format != "bf16":
                block_k = default_block_k(expert_format)
                coded = {id(w): quantize(w, expert_format, block_k) for pair in experts[:POOL] for w in pair}
                experts = [(coded[id(g)], coded[id(d)]) for g, d in experts]
            install_engine(block.experts, ExpertEngine.from_experts(num_experts, hidden, two_inter // 2, experts,
                                                                    format=expert_format))
        else:
            pools[block.index] = experts
    model.to_empty(device=device)  # installed experts stay on the CPU
    expert_modules = {id(block.experts) for block in blocks}
    torch.manual_seed(seed)
    for module in model.modules():  # the same modules in the same order in both builds: the same values
        if id(module) not in expert_modules:
            model._init_weights(module)
    with torch.no_grad():
        for block in (b for b in blocks if b.index in pools):  # the same experts, dense on `device`
            for e, (gate_up, down) in enumerate(pools.pop(block.index)):
                block.experts.gate_up_proj[e].copy_(gate_up)
                block.experts.down_proj[e].copy_(down)
    return model


def planned_dense_layers(config, opts, device: torch.device) -> int:
    """How many MoE layers keep their experts on the GPU: `kt_trl.placement` on the model as the
    trainer will see it (PEFT-wrapped, built on the meta device), or `--gpu-experts N` in layers."""
    from transformers import AutoModelForCausalLM

    from kt_trl import KTConfig
    from kt_trl.containers import find_decoder_layers, find_moe_blocks, unwrap_model
    from kt_trl.layouts import match_layout
    from kt_trl.placement import gpu_layers

    if opts.gpu_experts not in ("auto", "none"):  # on a CPU-only run these compute through torch on the CPU
        return min(int(opts.gpu_experts) // opts.experts, opts.layers)
    if opts.gpu_experts == "none" or device.type != "cuda":
        return 0
    from peft import get_peft_model

    with torch.device("meta"):
        probe = unwrap_model(get_peft_model(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16),
                                            lora_config()))
    blocks = find_moe_blocks(find_decoder_layers(probe), match_layout(probe))
    chosen = gpu_layers(probe, blocks, KTConfig(gpu_experts="auto", max_gpu_memory_gb=opts.max_gpu_memory_gb),
                        tokens=opts.batch * opts.seq, checkpointed=True, device=device)
    return len(chosen)


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ATTENTION_TARGETS,
                      target_parameters=EXPERT_TARGETS, task_type="CAUSAL_LM")


def reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so each step reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:  # not permitted here: the peak then covers the whole run so far
        pass


def host_memory() -> dict:
    """Resident and peak resident host memory of this process, in GB (/proc/self/status)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024 / 1e9
    return {"host_rss_gb": round(fields.get("VmRSS", 0.0), 3), "host_peak_rss_gb": round(fields.get("VmHWM", 0.0), 3)}


def host_cached_bytes() -> int:
    """Freed engine output memory the engine keeps for reuse (part of the RSS)."""
    from kt_trl._native.ffi import load

    return load()[1].kt_host_cached_bytes()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # step boundaries only: the benchmark's clock, not the training path


def cpu_trainable_bytes(model, optimizer) -> int:
    """Expert-LoRA (CPU) parameters + gradients + optimizer state, in bytes."""
    total = 0
    for param in model.parameters():
        if param.requires_grad and param.device.type == "cpu":
            total += 2 * param.numel() * param.element_size()  # the parameter and its gradient
            state = optimizer.state.get(param, {}) if optimizer is not None else {}
            total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


def thread_cpu_seconds() -> dict[int, tuple[str, float]]:
    """{thread id: (name, user + system CPU seconds)} of this process's threads (Linux; else empty)."""
    out, tick = {}, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ():
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def busy_threads(before: dict, after: dict, step_s: float, top: int = 6) -> list:
    """The threads that used the most CPU over a step: [name, tid, seconds, share of the step], the
    main thread marked; the rest summed into one entry. Shows who competes with the engine's workers."""
    used = sorted(((after[t][1] - before.get(t, ("", 0.0))[1], t) for t in after), reverse=True)
    main = os.getpid()
    rows = [[("main " if t == main else "") + after[t][0], t, round(s, 2), round(s / step_s, 2)] for s, t in used[:top]]
    rest = sum(s for s, _ in used[top:])
    return rows + [["others", len(used) - top, round(rest, 2), round(rest / step_s, 2)]]


def step_meter(tokens: int, warmup: int, sink: list, kind: str):
    """A `TrainerCallback` emitting one record per optimizer step (`kind`)."""
    from transformers import TrainerCallback

    from kt_trl._native.ops import profile_read
    from kt_trl.experts import expert_counters

    class StepMeter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            synchronize()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            reset_peak_rss()
            self.optimizer_s = 0.0
            self.before = expert_counters(model)
            profile_read(reset=True)
            self.threads = thread_cpu_seconds()
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            self.start = time.perf_counter()

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_start = time.perf_counter()

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.optimizer_s += time.perf_counter() - self.optimizer_start

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            synchronize()
            step_s = time.perf_counter() - self.start
            for module in model.modules():  # after the sync every H2D copy is done: count its device time
                if hasattr(module, "_kt_runner"):
                    module._kt_runner.staging.release_finished()
            after = expert_counters(model)
            delta = {key: after[key] - self.before[key] for key in after}
            record = {"kind": kind, "step": state.global_step, "warmup": state.global_step <= warmup,
                      "step_s": round(step_s, 4), "tokens": tokens, "tokens_per_s": round(tokens / step_s, 1),
                      **split_step(step_s, self.optimizer_s, delta), **host_memory(),
                      "engine_host_cache_gb": round(host_cached_bytes() / 1e9, 3),
                      "busy_threads": busy_threads(self.threads, thread_cpu_seconds(), step_s),
                      # page faults of the step (fresh memory touched: buffers not reused between steps)
                      "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults}
            if torch.cuda.is_available():
                record["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
            if delta["forward_calls"] or delta["backward_calls"]:
                stages = profile_read()
                busy_s = sum(stages.values()) / 1e3  # every engine stage, on whichever thread
                record["engine_busy_s"] = round(busy_s, 4)
                record["engine_stages_ms"] = {name: round(ms, 1) for name, ms in stages.items()}
                record["cpu_roofline_tokens_per_s"] = round(tokens / busy_s, 1)
                record["fraction_of_cpu_roofline"] = round(busy_s / step_s, 3)
                record["cpu_state_gb"] = round(cpu_trainable_bytes(model, optimizer) / 1e9, 3)
            emit(record, sink)

    return StepMeter()


def split_step(step_s: float, optimizer_s: float, d: dict) -> dict:
    """The step's host timeline: CPU experts, transfers, waiting on the GPU, optimizer, the rest."""
    transfers = d["pin_copy_seconds"] + d["d2h_gpu_seconds"] + d["h2d_gpu_seconds"]
    gpu_wait = max(0.0, d["wait_seconds"] - d["d2h_gpu_seconds"] - d["h2d_gpu_seconds"])
    parts = {"cpu_expert_forward_s": d["forward_seconds"], "cpu_expert_backward_s": d["backward_seconds"],
             "transfer_s": transfers, "gpu_wait_s": gpu_wait, "optimizer_s": optimizer_s}
    parts["rest_s"] = step_s - sum(parts.values())
    out = {key: round(value, 4) for key, value in parts.items()}
    out.update(expert_calls=[d["forward_calls"], d["reused_forwards"], d["backward_calls"]],
               transfer_gb=round((d["to_host_bytes"] + d["to_device_bytes"]) / 1e9, 4),
               kept_forwards_declined=d["kept_activation_declined"])
    return out


def train(model, tokenizer, dataset, opts, output_dir: str, meter, *, kt: bool, dense_layers: int = 0):
    """Train `model` for `opts.steps` steps with KTSFTTrainer (`kt`) or plain SFTTrainer; returns the trainer."""
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from kt_trl import KTConfig, KTSFTTrainer

    cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=output_dir, max_steps=opts.steps, per_device_train_batch_size=opts.batch, max_length=opts.seq,
        learning_rate=1e-4, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
        bf16=True, gradient_checkpointing=True, use_cpu=not cuda, seed=opts.seed, disable_tqdm=True,
        router_aux_loss_coef=opts.router_aux_loss_coef,
        dataloader_num_workers=0,
    )
    kwargs = dict(processing_class=tokenizer, peft_config=lora_config(), callbacks=[meter])
    if kt:
        kt_config = KTConfig(isa=opts.isa, threads=opts.threads, max_kept_activations_gb=opts.max_kept_activations_gb,
                             max_kept_activations_gpu_gb=opts.max_kept_activations_gpu_gb,
                             gpu_experts=dense_layers * opts.experts, torch_threads=opts.torch_threads)
        trainer = KTSFTTrainer(model, args, dataset, kt_config=kt_config, **kwargs)
    else:
        trainer = SFTTrainer(model, args, train_dataset=dataset, **kwargs)
    trainer.remove_callback(PrinterCallback)  # it prints the log dicts: stdout stays JSON lines
    trainer.train()
    return trainer


def losses(trainer) -> list[float]:
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def summarize(records: list[dict], kind: str) -> dict:
    """Means of the numeric fields over the steps after warm-up."""
    measured = [r for r in records if r["kind"] == kind and not r["warmup"]]
    keys = [key for key, value in measured[0].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"] if measured else []
    return {"steps": len(measured), **{key: round(sum(r[key] for r in measured) / len(measured), 4) for key in keys}}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="qwen3_moe", choices=sorted(FAMILIES))
    for name, default in (("layers", 48), ("hidden", 2048), ("experts", 128), ("intermediate", 768), ("top-k", 8),
                          ("heads", 32), ("kv-heads", 4), ("head-dim", 128), ("vocab", 151936),
                          ("dense-intermediate", 6144), ("batch", 4), ("seq", 2048), ("steps", 4), ("warmup", 1),
                          ("seed", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: KT_TRL_THREADS, else cores)")
    ap.add_argument("--isa", default=None, help="engine ISA: auto, amx, avx512, avx2, scalar (default: KT_TRL_ISA)")
    ap.add_argument("--max-kept-activations-gb", type=float, default=None,
                    help="KTConfig(max_kept_activations_gb=...): host budget of kept checkpoint activations")
    ap.add_argument("--max-kept-activations-gpu-gb", type=float, default=None,
                    help="KTConfig(max_kept_activations_gpu_gb=...): GPU budget of kept checkpoint activations")
    ap.add_argument("--gpu-experts", default="auto",
                    help="KTConfig(gpu_experts=...): auto, none or a number of experts kept on the GPU (whole layers)")
    ap.add_argument("--max-gpu-memory-gb", type=float, default=None, help="KTConfig(max_gpu_memory_gb=...)")
    ap.add_argument("--expert-format", default="bf16", choices=["bf16", "fp8", "int8"],
                    help="how the engines store the CPU layers' experts (KTConfig.expert_format)")
    ap.add_argument("--torch-threads", type=int, default=None, help="KTConfig(torch_threads=...)")
    ap.add_argument("--router-aux-loss-coef", type=float, default=None,
                    help="SFTConfig(router_aux_loss_coef=...): default the model's own; 0 turns the aux loss off")
    ap.add_argument("--reference", action="store_true", help="first train it all-on-GPU with plain PEFT SFTTrainer")
    ap.add_argument("--json", default=None, help="also write all records to this file")
    opts = ap.parse_args(argv)
    if opts.steps <= opts.warmup:
        ap.error(f"--steps ({opts.steps}) must exceed --warmup ({opts.warmup}) to measure anything")
    return opts


def main(argv=None) -> list[dict]:
    """Run the benchmark; returns the records it printed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    from kt_trl._native import configure
    from kt_trl.demo import build_tokenizer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    opts = parse(argv)
    records: list[dict] = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.zeros(1, device=device)  # the CUDA context belongs to the baseline, not to the model
    info = configure(isa=opts.isa, threads=opts.threads)  # before packing: the engine's ISA and threads
    emit({"kind": "runtime", **info, "torch_threads": torch.get_num_threads(), "device": str(device),
          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None, "torch": torch.__version__,
          "transformers": transformers.__version__, "args": vars(opts)}, records)
    generator = torch.Generator().manual_seed(opts.seed)
    ids = torch.randint(0, opts.vocab, (opts.steps * opts.batch, opts.seq), generator=generator)
    run = dict(config=model_config(opts), device=device, tokenizer=build_tokenizer(),
               dataset=datasets.Dataset.from_dict({"input_ids": ids.tolist()}),
               workdir=tempfile.mkdtemp(prefix="kt_trl_train_step_"), opts=opts, records=records)
    reference = run_reference(**run) if opts.reference else None
    summary = run_kt(**run)
    if reference is not None:
        ref_summary = summarize(records, "reference_step")
        emit({"kind": "parity", "reference_losses": reference, "kt_losses": summary["losses"],
              "max_loss_rel_diff": round(max(abs(a - b) / abs(b) for a, b in zip(summary["losses"], reference)), 5),
              "reference_tokens_per_s": ref_summary["tokens_per_s"],
              "speedup_vs_reference": round(summary["tokens_per_s"] / ref_summary["tokens_per_s"], 3)}, records)
    if opts.json:
        with open(opts.json, "w") as sink:
            sink.writelines(json.dumps(r) + "\n" for r in records)
    return records


def run_reference(*, config, device, tokenizer, dataset, workdir, opts, records) -> list[float]:
    """Plain PEFT SFTTrainer, the experts dense on `device`; returns the losses and frees the model."""
    model = build_model(config, device=device, seed=opts.seed, engines=False)
    meter = step_meter(opts.batch * opts.seq, opts.warmup, records, "reference_step")
    trainer = train(model, tokenizer, dataset, opts, os.path.join(workdir, "reference"), meter, kt=False)
    result = losses(trainer)
    del model, trainer, meter
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_kt(*, config, device, tokenizer, dataset, workdir, opts, records) -> dict:
    """KTSFTTrainer on the model with engine-held experts; emits `model` and `summary`, returns the summary."""
    from kt_trl.experts import expert_counters

    baseline = host_memory()["host_rss_gb"]
    start = time.perf_counter()
    dense_layers = planned_dense_layers(config, opts, device)
    model = build_model(config, device=device, seed=opts.seed, engines=True, dense_layers=dense_layers,
                        expert_format=opts.expert_format)
    build_s = round(time.perf_counter() - start, 2)
    emit({"kind": "model", "family": opts.family, "layers": opts.layers, "build_s": build_s,
          "expert_format": opts.expert_format,
          "gpu_layers": dense_layers,
          "gpu_allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 3) if device.type == "cuda" else None,
          "host_rss_before_build_gb": baseline, **host_memory()}, records)
    meter = step_meter(opts.batch * opts.seq, opts.warmup, records, "step")
    trainer = train(model, tokenizer, dataset, opts, os.path.join(workdir, "kt"), meter, kt=True,
                    dense_layers=dense_layers)
    report = trainer.kt_report
    summary = {"kind": "summary", **summarize(records, "step"), "losses": losses(trainer),
               "initial_loss_uniform": round(math.log(opts.vocab), 4), "packed_bytes": report.packed_bytes,
               "packed_gb": round(report.packed_bytes / 1e9, 3),
               "isa": report.isa, "threads": report.threads, "expert_lora_parameters": report.expert_lora_parameters,
               "gpu_layers": list(report.gpu_layers), "gpu_expert_gb": round(report.gpu_expert_bytes / 1e9, 3),
               "trainable_parameters": report.trainable_parameters}
    measured = [r for r in records if r["kind"] == "step" and not r["warmup"]]
    counters = expert_counters(model)
    host_peak = max(r["host_peak_rss_gb"] for r in measured)
    budget = max(report.packed_bytes / 1e9 + summary.get("cpu_state_gb", 0.0), 1e-9)
    summary.update(max_host_peak_rss_gb=host_peak, host_rss_ratio=round(host_peak / budget, 3),
                   host_rss_ratio_above_baseline=round((host_peak - baseline) / budget, 3),
                   kept_activations_host_peak_gb=round(counters["kept_activation_peak_bytes"] / 1e9, 3),
                   kept_activations_gpu_peak_gb=round(counters["kept_activation_device_peak_bytes"] / 1e9, 3))
    gpu_peak = max((r.get("gpu_peak_gb", 0.0) for r in measured), default=0.0)
    summary["goals"] = {  # the targets for the full Qwen3-30B-A3B shape on an H200 + 16-core AMX Xeon
        "tokens/s >= 0.8 x CPU roofline": summary.get("fraction_of_cpu_roofline", 1.0) >= 0.8,
        f"GPU peak {gpu_peak} GB <= 20 GB": gpu_peak <= 20,
        "host peak RSS <= 1.15 x (packed experts + CPU LoRA state)": summary["host_rss_ratio"] <= 1.15,
    }
    emit(summary, records)
    return summary


if __name__ == "__main__":
    main()
