"""Shared fixtures: tiny MoE models of every supported family, an in-process tokenizer, a tiny dataset.

Everything runs offline on the CPU. The trainer-level tests run torch single-threaded: the models are
tiny, and OpenMP spin-waiting on a busy 2-core CI box costs 100x more than it gains.
"""

from __future__ import annotations

import copy
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
for _name in ("datasets", "accelerate", "trl", "peft"):
    logging.getLogger(_name).setLevel(logging.ERROR)

from tests.helpers import VOCAB  # noqa: E402


@pytest.fixture(scope="session")
def dataset():
    from kt_trl.demo import load_instructions

    return load_instructions()


@pytest.fixture(scope="session")
def tokenizer(dataset):
    from kt_trl.demo import build_tokenizer

    tok = build_tokenizer(dataset, vocab_size=VOCAB)
    assert len(tok) <= VOCAB
    return tok


@pytest.fixture
def fresh_tokenizer(tokenizer):
    """A copy: SFTTrainer sets pad/eos tokens on the tokenizer it gets."""
    return copy.deepcopy(tokenizer)


@pytest.fixture
def cpu_only(monkeypatch):
    """The run as on a machine without a GPU (a GPU host would place experts there; tests/test_gpu.py covers it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def _single_threaded_torch(request):
    if "native" in request.node.path.parts:  # the engine's own tests choose their threads
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
