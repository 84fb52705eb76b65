"""The map from checkpoint keys to experts and rows (`checkpoint_rows`) against the checkpoint
transformers' own `save_pretrained` writes: the same keys, and each key's tensor equal to the rows
of the fused parameter the map names."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors import safe_open

from kt_trl.checkpoint_keys import checkpoint_rows
from kt_trl.layouts import EXPERT_PARAMETERS
from tests.helpers import tiny_config


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "olmoe"])
def test_keys_and_rows_are_those_save_pretrained_writes(family, tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, num_hidden_layers=3))
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    fused = {name: p.shape for name, p in state.items() if name.rsplit(".", 1)[-1] in EXPERT_PARAMETERS}
    assert len(fused) >= 4, fused
    found = {name: checkpoint_rows(model, name, shape) for name, shape in fused.items()}
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert {key for per_key in found.values() for key in per_key} == {k for k in f.keys() if ".experts." in k}
        for name, per_key in found.items():
            for key, entry in per_key.items():
                assert entry.expert is not None
                assert torch.equal(state[name][entry.expert][entry.rows], f.get_tensor(key))
