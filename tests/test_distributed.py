"""Two ranks under torchrun (gloo, CPU): DDP leaves the routed experts alone, the expert LoRA is reduced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import json, os, re, sys
import torch
from peft import LoraConfig
from kt_trl import KTConfig, KTSFTTrainer, distributed
from kt_trl.demo import build_tokenizer, load_instructions
from tests.helpers import expert_targets, sft_args, step_losses, tiny_model

out, batch, reduce, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "reduce", int(sys.argv[4]), sys.argv[5]
if not reduce:  # what DDP alone would do: the expert LoRA of each rank trains on its own tokens
    distributed.reduce_expert_gradients = lambda model: 0
if os.environ.get("SHM_FULL"):  # a /dev/shm without room: reserving the shared copy fails as it would there
    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")
    os.posix_fallocate = no_room
dataset = load_instructions()
family = os.environ.get("FAMILY", "qwen3_moe")
experts = expert_targets(family)
trainer = KTSFTTrainer(
    os.environ.get("MODEL_PATH") or tiny_model(family), sft_args(out, family, max_steps=steps, per_device_train_batch_size=batch,
                                                               save_strategy="steps", save_steps=2), dataset,
    processing_class=build_tokenizer(dataset),
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=experts),
    kt_config=KTConfig(gpu_experts=int(os.environ.get("GPU_EXPERTS", "0")) or "auto"),
)
def shared_expert_memory():  # (Rss, Pss) bytes of the mappings of the host's packed experts (unlinked files)
    rss = pss = 0
    inside = False
    for line in open("/proc/self/smaps"):
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            inside = "/dev/shm/kt_trl-" in line
        elif inside and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
        elif inside and line.startswith("Pss:"):
            pss += int(line.split()[1]) * 1024
    return rss, pss


trainer.train(resume_from_checkpoint=resume == "resume")
rank = int(os.environ.get("RANK", "0"))
rss, pss = shared_expert_memory()
packed = trainer.kt_report.packed_bytes
torch.save({n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}, f"{out}/params{rank}.pt")
json.dump({"losses": step_losses(trainer), "gpu_layers": trainer.kt_report.gpu_layers, "affinity": sorted(os.sched_getaffinity(0)),
           "threads": trainer.kt_report.threads, "shared_rss": rss, "shared_pss": pss, "packed": packed,
           "shm_files": [f for f in os.listdir("/dev/shm") if f.startswith("kt_trl-")]},
          open(f"{out}/rank{rank}.json", "w"))
"""


def _launch(out: Path, *, ranks: int, batch: int, reduce: bool = True, steps: int = 3, resume: bool = False,
            shm_full: bool = False, model_path: Path | None = None, gpu_experts: int = 0,
            family: str = "qwen3_moe") -> None:
    out.mkdir(exist_ok=resume)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # CPU ranks: with a GPU visible, accelerate's barrier passes device_ids=[local rank] and torch then asks for
    # that CUDA device, which a one-GPU host lacks for rank 1 (plain SFTTrainer fails the same way there).
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if shm_full:
        env["SHM_FULL"] = "1"
    if model_path is not None:   # streamed by load_model instead of packed from a model in memory
        env["MODEL_PATH"] = str(model_path)
    env["FAMILY"] = family
    if gpu_experts:   # that many experts' layers in transformers' path on the training device (here the CPU)
        env["GPU_EXPERTS"] = str(gpu_experts)
    script = out / "train.py"
    script.write_text(TRAIN)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = (launcher if ranks > 1 else [sys.executable]) + [str(script), str(out), str(batch),
                                                             "reduce" if reduce else "no-reduce", str(steps),
                                                             "resume" if resume else "fresh"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if "Error" in line and "File " not in line]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n" + done.stderr[-2000:]


def _params(out: Path, rank: int) -> dict:
    return torch.load(out / f"params{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    _launch(root / "two", ranks=2, batch=2)
    _launch(root / "one", ranks=1, batch=4)  # the same global batches in one process
    _launch(root / "unreduced", ranks=2, batch=2, reduce=False)
    _launch(root / "resumed", ranks=2, batch=2, steps=2)   # stops after checkpoint-2 ...
    _launch(root / "resumed", ranks=2, batch=2, steps=3, resume=True)   # ... and goes on from it
    _launch(root / "private", ranks=2, batch=2, shm_full=True)
    tiny_model("qwen3_moe").save_pretrained(root / "checkpoint")
    _launch(root / "streamed", ranks=2, batch=2, model_path=root / "checkpoint")
    _launch(root / "split", ranks=2, batch=2, gpu_experts=8)   # layer 0 in transformers' path, layer 1 packed
    _launch(root / "streamed_split", ranks=2, batch=2, model_path=root / "checkpoint", gpu_experts=8)
    _launch(root / "gpt_oss", ranks=2, batch=2, family="gpt_oss")   # biased experts: each rank keeps the biases
    tiny_model("gpt_oss").save_pretrained(root / "gpt_oss_checkpoint")
    _launch(root / "streamed_gpt_oss", ranks=2, batch=2, model_path=root / "gpt_oss_checkpoint", family="gpt_oss")
    return root


def test_ranks_hold_identical_parameters(runs):
    first, second = _params(runs / "two", 0), _params(runs / "two", 1)
    assert any(".experts." in name for name in first)
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)


def test_two_ranks_train_like_one_process_on_the_same_global_batches(runs):
    two = json.loads((runs / "two" / "rank0.json").read_text())["losses"]
    one = json.loads((runs / "one" / "rank0.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=2e-2, atol=0.0)
    # Parameters: the same direction (the test's BF16 experts and token weighting differ slightly
    # between one micro-batch of 4 and two of 2; LoRA B starts at zero, so it is all update).
    single, ddp = _params(runs / "one", 0), _params(runs / "two", 0)
    for name, value in single.items():
        cosine = torch.nn.functional.cosine_similarity(ddp[name].flatten(), value.flatten(), dim=0)
        assert cosine > 0.99, f"{name}: cosine {cosine:.4f}"


def test_without_the_expert_reduction_the_ranks_diverge(runs):
    first, second = _params(runs / "unreduced", 0), _params(runs / "unreduced", 1)
    experts = [n for n in first if ".experts." in n]
    assert experts and all(not torch.equal(first[n], second[n]) for n in experts)
    assert all(torch.equal(first[n], second[n]) for n in first if ".experts." not in n)  # DDP reduced the rest


def test_each_rank_runs_on_its_share_of_the_cores(runs):
    ranks = [json.loads((runs / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to share")
    assert not set(ranks[0]["affinity"]) & set(ranks[1]["affinity"])


@pytest.mark.parametrize("run", ["two", "streamed", "streamed_split", "streamed_gpt_oss"],
                         ids=["packed", "streamed", "streamed-split", "streamed-gpt-oss"])
def test_the_host_holds_one_copy_of_the_experts(runs, run):
    ranks = [json.loads((runs / run / f"rank{r}.json").read_text()) for r in (0, 1)]
    packed = ranks[0]["packed"]
    assert packed > 0
    for rank in ranks:   # both map all of it; each is charged half of it (proportional set size)
        assert rank["shared_rss"] >= packed
        assert abs(rank["shared_pss"] - packed / 2) <= 0.05 * packed, rank
        assert rank["shm_files"] == []   # unlinked once both had mapped them
    single = json.loads((runs / "one" / "rank0.json").read_text())
    assert single["shared_rss"] == 0   # one process on the host: its own memory


def test_one_adapter_is_saved_and_every_rank_resumes_from_it(runs):
    checkpoint = runs / "resumed" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("adapter_model*")) == ["adapter_model.safetensors"]
    for rank in (0, 1):   # 2 steps, a checkpoint, 1 more step = 3 steps in one go
        resumed, straight = _params(runs / "resumed", rank), _params(runs / "two", rank)
        for name, value in straight.items():
            torch.testing.assert_close(resumed[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_without_room_in_dev_shm_each_rank_keeps_its_own_copy_and_trains_the_same(runs):
    shared = json.loads((runs / "two" / "rank0.json").read_text())
    for rank in (0, 1):
        private = json.loads((runs / "private" / f"rank{rank}.json").read_text())
        assert private["shared_rss"] == 0 and private["shm_files"] == []
        assert private["losses"] == shared["losses"]
        for name, value in _params(runs / "two", rank).items():
            torch.testing.assert_close(_params(runs / "private", rank)[name], value, rtol=0, atol=0, msg=name)


def test_a_streamed_checkpoint_trains_like_the_model_it_was_saved_from(runs):
    for rank in (0, 1):
        streamed = json.loads((runs / "streamed" / f"rank{rank}.json").read_text())
        assert streamed["losses"] == json.loads((runs / "two" / f"rank{rank}.json").read_text())["losses"]


def test_a_split_streamed_checkpoint_trains_like_the_split_model(runs):
    """Layer 0 read into transformers' path by load_model, layer 1 streamed into the host's one engine."""
    for rank in (0, 1):
        split = json.loads((runs / "split" / f"rank{rank}.json").read_text())
        streamed = json.loads((runs / "streamed_split" / f"rank{rank}.json").read_text())
        assert split["gpu_layers"] == streamed["gpu_layers"] == [0]
        assert streamed["losses"] == split["losses"] and len(split["losses"]) == 3
    first, second = _params(runs / "streamed_split", 0), _params(runs / "streamed_split", 1)
    assert any("layers.0.mlp.experts" in name for name in first)   # the kept layer's LoRA, reduced by DDP
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)


def test_a_streamed_gpt_oss_checkpoint_trains_like_the_model_it_was_saved_from(runs):
    """The second rank maps the first rank's packed experts and adds the biases itself."""
    for rank in (0, 1):
        streamed = json.loads((runs / "streamed_gpt_oss" / f"rank{rank}.json").read_text())
        packed = json.loads((runs / "gpt_oss" / f"rank{rank}.json").read_text())
        assert streamed["losses"] == packed["losses"] and len(packed["losses"]) == 3
