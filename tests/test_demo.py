"""`python -m kt_trl.demo` end to end, shrunk."""

from __future__ import annotations

import json

from kt_trl import demo


def test_demo_trains_and_saves(tmp_path, capsys):
    summary = demo.main(["--steps", "4", "--hidden-size", "64", "--experts", "8", "--output-dir", str(tmp_path)])
    assert len(summary["losses"]) == 4 and summary["losses"][-1] < summary["losses"][0]
    assert summary["tokens_per_second"] > 0 and summary["expert_forward_calls"] == 4 * 4  # 4 layers x 4 steps
    out = capsys.readouterr().out
    for needle in ("routed experts of 4 layer(s)", "losses (4 steps)", "tokens/s", "CPU experts backward",
                   "ISA path: ", f"adapter saved to: {tmp_path}"):
        assert needle in out
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "mlp.experts.gate_up_proj" in config["target_parameters"]


def test_shipped_dataset_and_tokenizer():
    dataset = demo.load_instructions()
    assert len(dataset) == 64 and dataset[0]["messages"][0]["role"] == "user"
    tokenizer = demo.build_tokenizer(dataset)
    text = tokenizer.apply_chat_template(dataset[0]["messages"], tokenize=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text and len(tokenizer) <= 384


def test_demo_without_output_dir_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(demo.tempfile, "tempdir", None)  # re-read TMPDIR
    summary = demo.main(["--steps", "1", "--hidden-size", "64", "--layers", "1", "--experts", "8"])
    assert summary["adapter_dir"] is None and list(tmp_path.iterdir()) == []
    assert "pass --output-dir DIR to keep it" in capsys.readouterr().out
