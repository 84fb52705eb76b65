"""Every example in the public docstrings and the README runs as written.

Examples about "your model" get a tiny Qwen3-MoE as `model` (with its `config`, a `tokenizer` and
the shipped `train_dataset`), fresh for each example; they run in a temporary directory.
"""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

from kt_trl.demo import build_model, build_tokenizer, load_instructions

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (ROOT / "kt_trl").glob("*.py") if ">>>" in p.read_text())


def user_namespace() -> dict:
    dataset = load_instructions()
    tokenizer = build_tokenizer(dataset)
    model = build_model(len(tokenizer))
    return {"model": model, "config": model.config, "tokenizer": tokenizer, "train_dataset": dataset}


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tests = doctest.DocTestFinder().find(importlib.import_module(f"kt_trl.{module}"))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    examples = 0
    for test in (t for t in tests if t.examples):
        for example in test.examples:  # the closing fence of a ```python block is not output
            example.want = re.sub(r"^[ \t]*```[ \t]*\n?", "", example.want, flags=re.M)
        test.globs.update(user_namespace())
        runner.run(test)
        examples += len(test.examples)
    assert examples > 0 and runner.summarize(verbose=False).failed == 0


def test_readme_python_blocks_run_in_order(tmp_path, monkeypatch):
    """The README's blocks in order, on a CPU-only machine as its comments say."""
    import torch

    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    namespace = user_namespace()
    base = tmp_path / "base"  # where the model "came from": its config and tokenizer, as from_pretrained leaves it
    namespace["model"].config.save_pretrained(base)
    namespace["tokenizer"].save_pretrained(base)
    namespace["model"].config._name_or_path = namespace["base_model_dir"] = str(base)
    if not torch.cuda.is_available():
        blocks = [b.replace('max_steps=2)', 'max_steps=2, use_cpu=True)') for b in blocks]
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert len(blocks) >= 3
