"""kt_trl: LoRA fine-tuning of huge MoE LLMs on one GPU plus a big CPU, with stock TRL.

Public API: `KTSFTTrainer`, `KTConfig`, `load_model`, `plan`, `save_per_expert_adapter`. Imports are lazy:
`import kt_trl` loads neither trl nor the native engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["KTConfig", "KTSFTTrainer", "load_model", "plan", "save_per_expert_adapter", "__version__"]

if TYPE_CHECKING:
    from .config import KTConfig
    from .loading import load_model
    from .per_expert_adapter import save_per_expert_adapter
    from .preflight import plan
    from .trainer import KTSFTTrainer


def __getattr__(name: str):
    if name == "KTSFTTrainer":
        from .trainer import KTSFTTrainer

        return KTSFTTrainer
    if name == "KTConfig":
        from .config import KTConfig

        return KTConfig
    if name == "load_model":
        from .loading import load_model

        return load_model
    if name == "plan":
        from .preflight import plan

        return plan
    if name == "save_per_expert_adapter":
        from .per_expert_adapter import save_per_expert_adapter

        return save_per_expert_adapter
    raise AttributeError(f"module 'kt_trl' has no attribute {name!r}")
