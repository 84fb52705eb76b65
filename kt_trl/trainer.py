"""`KTSFTTrainer`: trl's `SFTTrainer` with the routed experts on the native CPU engine."""

from __future__ import annotations

import copy
import os

from torch import nn
from trl import SFTTrainer

from .checkpointing import checkpointing_requested
from .config import KTConfig
from . import distributed
from .containers import unwrap_model
from .cpu_threads import torch_threads
from .loading import load_model, model_init_kwargs
from .lora import requested_expert_lora
from .prepare import prepare_model
from .report import RoutingReport
from .saving import save_checkpoint_atomically
from .step_log import StepTimeLog


class KTSFTTrainer(SFTTrainer):
    """`trl.SFTTrainer` whose MoE model computes its routed experts (and their LoRA) on the CPU.

    The experts' forward and backward, expert LoRA included, run in kt_trl's native engine; the
    router, shared experts, attention, embeddings, norms and lm_head train on the accelerator as
    usual. Everything `SFTTrainer` accepts keeps working; only the additions are documented here.

    Args:
        model (`str`, `PreTrainedModel` or `PeftModel`):
            A transformers MoE causal LM of a supported family (see `kt_trl.layouts`), or a
            checkpoint directory / Hub id, loaded with `kt_trl.load_model` (experts streamed into
            the engine, `args.model_init_kwargs` honoured, `kt_trl.plan(...).check()` first).
        args (`trl.SFTConfig`, *optional*):
            As for `SFTTrainer`.
        train_dataset (`datasets.Dataset` or `IterableDataset`):
            As for `SFTTrainer`. Third positional argument, as TRL users write it.
        kt_config (`KTConfig`, *optional*):
            Engine settings (ISA, threads, activation reuse under gradient checkpointing). Defaults
            to `KTConfig()`, or for a model a trainer prepared before, to the settings it has; a
            config given for such a model is applied to it.
        **kwargs:
            Any other `SFTTrainer` keyword (`peft_config`, `processing_class`, `eval_dataset`, ...).

    Example:

    ```python
    >>> import torch
    >>> from kt_trl import KTSFTTrainer
    >>> from peft import LoraConfig
    >>> from trl import SFTConfig
    >>> args = SFTConfig(output_dir="out", max_steps=2, report_to="none", use_cpu=not torch.cuda.is_available())
    >>> trainer = KTSFTTrainer(model, args, train_dataset, processing_class=tokenizer,
    ...                        peft_config=LoraConfig(r=16, target_modules="all-linear"))
    >>> trainer.train()  # doctest: +ELLIPSIS
    {...}
    TrainOutput(global_step=2, ...)
    >>> trainer.kt_report.layers_routed + trainer.kt_report.gpu_layers   # on the CPU engine, then kept on the GPU
    (0, 1)
    ```
    """

    _tag_names = ["trl", "sft", "kt_trl"]
    _name = "KT-SFT"

    def __init__(self, model, args=None, train_dataset=None, *, kt_config: KTConfig | None = None, **kwargs):
        self.kt_config = kt_config  # None: KTConfig() for a new model, the settings it has for a prepared one
        self.kt_report: RoutingReport | None = None
        self._kt_step_log = StepTimeLog()
        # PEFT rewrites the config in place (e.g. resolves "all-linear"), so read the intent first.
        self._kt_expert_lora_requested = requested_expert_lora(kwargs.get("peft_config"))
        if isinstance(model, (str, os.PathLike)):
            # trl would load it with from_pretrained, the experts fused in memory before packing: stream them
            # into engines instead, with trl's model_init_kwargs (dtype, ...), after a preflight plan.
            # quantization_config only when given: None would override the checkpoint's own (an FP8 one)
            quantization = kwargs.pop("quantization_config", None)
            given = {} if quantization is None else {"quantization_config": quantization}
            model = load_model(model, kt_config=kt_config, args=args, peft_config=kwargs.get("peft_config"),
                               **given, **model_init_kwargs(args))
            if args is not None and args.model_init_kwargs is not None:  # used: spare trl's "ignored" warning
                args = copy.copy(args)
                args.model_init_kwargs = None
        super().__init__(model, args, train_dataset=train_dataset, **kwargs)
        self.add_callback(self._kt_step_log)
        # Trainer skips placement for DeepSpeed, FSDP, model parallel and *_full_eval; prepare anyway.
        self._prepare_model(self.model)

    def _prepare_model(self, model: nn.Module) -> RoutingReport:
        """Route `model`'s experts through the CPU engine (idempotent; `prepare_model` logs the report once)."""
        requested = self._kt_expert_lora_requested or None
        args = getattr(self, "args", None)
        tokens = args.per_device_train_batch_size * (getattr(args, "max_length", None) or 1024) if args else None
        self.kt_report = prepare_model(model, self.kt_config, expert_lora_requested=requested, tokens_per_batch=tokens,
                                       gradient_checkpointing=checkpointing_requested(args),
                                       device=args.device if args is not None else None)
        if self.kt_config is None:
            self.kt_config = unwrap_model(model)._kt_config
        return self.kt_report

    def _move_model_to_device(self, model: nn.Module, device) -> None:
        # trl has no model-preparation hook: this is the one point after PEFT wrapping and before
        # any placement (Trainer.__init__ and Accelerator.prepare_model both move the model).
        self._prepare_model(model)
        super()._move_model_to_device(model, device)

    def train(self, *args, **kwargs):
        with torch_threads(self.args.device, (self.kt_config or KTConfig()).torch_threads):
            return super().train(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # DDP ignores the expert LoRA: reduce it before Trainer clips
            distributed.reduce_expert_gradients(self.model)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """As `SFTTrainer.log`, training lines with the engine's share of the step (`kt_trl.step_log`)."""
        self._kt_step_log.add_to(logs, self.model, self.state.global_step)
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        # Written under a hidden name and renamed when complete: resume never finds half a checkpoint.
        save_checkpoint_atomically(self, lambda: super(KTSFTTrainer, self)._save_checkpoint(model, trial),
                                   run_dir=super()._get_output_dir(trial=trial))

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_kt_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial=trial)

    def _wrap_model(self, model: nn.Module, training: bool = True, dataloader=None) -> nn.Module:
        self._prepare_model(model)
        return super()._wrap_model(model, training=training, dataloader=dataloader)
