"""Torch's intra-op threads while training on the CPU beside the engine."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from kt_trl import KTConfig, KTSFTTrainer
from kt_trl.cpu_threads import training_threads
from tests.helpers import sft_args, tiny_model


def test_the_rule(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert training_threads("cpu", None) == 1 and training_threads("cpu", 3) == 3
    assert training_threads("cuda:0", None) is None and training_threads("cuda:0", 2) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert training_threads("cpu", None) is None  # the user's choice stands


class ThreadsSeen(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        self.seen = torch.get_num_threads()


@pytest.mark.parametrize("requested, expected", [(None, 1), (2, 2)])
def test_train_runs_with_the_chosen_threads_and_restores_them(requested, expected, tmp_path, tokenizer, dataset,
                                                               monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        seen = ThreadsSeen()
        trainer = KTSFTTrainer(tiny_model("qwen3_moe"), sft_args(tmp_path, max_steps=1), dataset,
                               processing_class=copy.deepcopy(tokenizer), callbacks=[seen],
                               kt_config=KTConfig(freeze_experts=True, torch_threads=requested))
        trainer.train()
        assert seen.seen == expected and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
