"""Checkpoints appear only when complete: a SIGKILL in the middle of a save, then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import os, signal, sys
from peft import LoraConfig
from kt_trl import KTSFTTrainer
from kt_trl.demo import build_tokenizer, load_instructions
from tests.helpers import expert_targets, sft_args, tiny_model

out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
dataset = load_instructions()
trainer = KTSFTTrainer(
    tiny_model("qwen3_moe"), sft_args(out, max_steps=3, save_strategy="steps", save_steps=1), dataset,
    processing_class=build_tokenizer(dataset),
    peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("qwen3_moe")),
)
save_rng_state = trainer._save_rng_state
def killed_halfway(output_dir):   # the adapter and optimizer are written, the RNG and trainer state are not
    if trainer.state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    save_rng_state(output_dir)
trainer._save_rng_state = killed_halfway
trainer.train(resume_from_checkpoint=resume)
print("global_step", trainer.state.global_step)
"""


def _run(out: Path, kill_at: int, mode: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", TRAIN, str(out), str(kill_at), mode], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_resume_after_a_kill_during_a_save_uses_the_last_complete_checkpoint(tmp_path):
    killed = _run(tmp_path, kill_at=2, mode="fresh")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-1"]
    resumed = _run(tmp_path, kill_at=-1, mode="resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "global_step 3" in resumed.stdout
    names = sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # the half-written staging is gone
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    # step 1 logged by the killed run (restored from checkpoint-1), steps 2 and 3 by the resumed one
    assert state["global_step"] == 3 and [log["step"] for log in state["log_history"] if "loss" in log] == [1, 2, 3]
