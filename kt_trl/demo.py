"""`python -m kt_trl.demo`: train a small MoE with `KTSFTTrainer`, offline, on whatever hardware is here.

Builds everything in-process (no downloads): a Qwen3-MoE-style model from a config with random
weights, a byte-level BPE tokenizer trained on the shipped instruction set
(`kt_trl/data/instructions.jsonl`) with a ChatML template, and LoRA on attention, router and
experts. Prints the losses, tokens/s, where the step time went, the engine's ISA path and where the
adapter was saved. The builders are reused by the quickstart notebook and the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from importlib import resources

from transformers import TrainerCallback

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def load_instructions():
    """The shipped instruction set as a `datasets.Dataset` with a `messages` column (64 rows)."""
    from datasets import Dataset

    text = resources.files("kt_trl").joinpath("data/instructions.jsonl").read_text(encoding="utf-8")
    return Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])


def build_tokenizer(dataset=None, vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in-process, with a ChatML chat template.

    Args:
        dataset: Rows with `messages`; defaults to `load_instructions()`.
        vocab_size: Target vocabulary size (byte alphabet + merges + 3 special tokens).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    dataset = dataset if dataset is not None else load_instructions()
    texts = [m["content"] for row in dataset for m in row["messages"]] + ["user", "assistant", "system"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_experts: int = 8,
    top_k: int = 2,
    moe_intermediate_size: int = 32,
    seed: int = 0,
):
    """A Qwen3-MoE causal LM built from a config with random weights (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        moe_intermediate_size=moe_intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=True,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def lora_config(r: int = 8):
    """LoRA on attention, the router and the routed experts (the last two through PEFT `target_parameters`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=2 * r,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        task_type="CAUSAL_LM",
    )


class _LossBar(TrainerCallback):
    """A tqdm progress bar showing the latest loss."""

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, desc="KTSFTTrainer", unit="step")

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def _expert_seconds(model) -> tuple[float, float, int]:
    from .experts import expert_counters

    counters = expert_counters(model)
    return counters["forward_seconds"], counters["backward_seconds"], counters["forward_calls"]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m kt_trl.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--output-dir", default=None, help="where to save the adapter (default: a temporary directory, removed at the end)")
    parser.add_argument("--isa", default=None, help="engine ISA: auto, amx, avx512, avx2, scalar (default: KT_TRL_ISA or auto)")
    parser.add_argument("--threads", type=int, default=None, help="engine threads (default: physical cores)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Train, print a summary, return it as a dict (losses, tokens/s, timings, ISA, adapter path or
    None when no `--output-dir` was given)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()

    opts = _parse(argv)
    if opts.output_dir is None:  # nothing left behind: the adapter goes to a directory removed at the end
        with tempfile.TemporaryDirectory(prefix="kt_trl_demo_") as output_dir:
            return _train(opts, output_dir, kept=False)
    return _train(opts, opts.output_dir, kept=True)


def _train(opts, output_dir: str, *, kept: bool) -> dict:
    import torch
    from transformers.trainer_callback import ProgressCallback
    from trl import SFTConfig

    from . import KTConfig, KTSFTTrainer

    dataset = load_instructions()
    tokenizer = build_tokenizer(dataset)
    model = build_model(
        len(tokenizer), hidden_size=opts.hidden_size, num_layers=opts.layers, num_experts=opts.experts,
        top_k=4, moe_intermediate_size=opts.hidden_size // 2,
    )
    args = SFTConfig(
        output_dir=output_dir, max_steps=opts.steps, per_device_train_batch_size=8, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, max_length=64, save_strategy="no", report_to="none",
        include_num_input_tokens_seen="non_padding", bf16=torch.cuda.is_available(), seed=0,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=False,
    )
    trainer = KTSFTTrainer(
        model, args, dataset, processing_class=tokenizer, peft_config=lora_config(),
        # a model this small would fit any GPU whole: keep its experts on the CPU engine, which is what this shows
        kt_config=KTConfig(isa=opts.isa, threads=opts.threads, gpu_experts="none"),
    )
    trainer.remove_callback(ProgressCallback)  # it prints every log dict; ours shows the loss on the bar
    trainer.add_callback(_LossBar())
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(output_dir)
    summary = _summarize(trainer, seconds, output_dir if kept else None)
    _print(summary, trainer.kt_report)
    return summary


def _summarize(trainer, seconds: float, output_dir: str | None) -> dict:
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    expert_forward, expert_backward, calls = _expert_seconds(trainer.model)
    return {
        "losses": losses,
        "tokens_per_second": trainer.state.num_input_tokens_seen / seconds,
        "train_seconds": seconds,
        "expert_forward_seconds": expert_forward,
        "expert_backward_seconds": expert_backward,
        "expert_forward_calls": calls,
        "isa": trainer.kt_report.isa,
        "threads": trainer.kt_report.threads,
        "adapter_dir": output_dir,
    }


def _print(summary: dict, report) -> None:
    losses = summary["losses"]
    seconds = summary["train_seconds"]
    rest = seconds - summary["expert_forward_seconds"] - summary["expert_backward_seconds"]
    print(report.summary())
    print(f"losses ({len(losses)} steps): " + " ".join(f"{x:.3f}" for x in losses))
    print(f"first -> last loss: {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"throughput: {summary['tokens_per_second']:.0f} tokens/s over {seconds:.1f} s")
    print(
        "step time: CPU experts forward {:.1f} s ({:.0%}), CPU experts backward {:.1f} s ({:.0%}), "
        "everything else {:.1f} s ({:.0%}); {} expert forward calls".format(
            summary["expert_forward_seconds"], summary["expert_forward_seconds"] / seconds,
            summary["expert_backward_seconds"], summary["expert_backward_seconds"] / seconds,
            rest, rest / seconds, summary["expert_forward_calls"],
        )
    )
    print(f"ISA path: {summary['isa']} ({summary['threads']} threads)")
    if summary["adapter_dir"] is None:
        print("adapter saved to a temporary directory, now removed (pass --output-dir DIR to keep it)")
    else:
        print(f"adapter saved to: {summary['adapter_dir']}")


if __name__ == "__main__":
    main()
