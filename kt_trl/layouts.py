"""The architecture registry: where each MoE family keeps its routed experts, as data.

Every family transformers 5 ships with fused experts stores them in one module with 3-D parameters
(never a ModuleList; the checkpoint files keep per-expert keys, which transformers fuses at load).
The standard layout, which the CPU engine runs, is

    gate_up_proj [E, 2I, H]   gate rows first, then up rows (not interleaved), no bias
    down_proj    [E, H, I]
    Expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))

Families differ only in where the MoE block sits in a decoder layer, what its router and shared
experts are called, and (gpt-oss) in the expert layout itself: transposed `[E, H, 2I]` / `[E, I, H]`,
gate/up interleaved, biases and a clamped SwiGLU, which the converters at the bottom of this module
turn into the standard layout one expert at a time (so a layer is never held twice), and the
engine computes natively. One frozen `ExpertLayout` per family records that; `match_layout` finds the entry with a first-match chain of small `match_*` functions
and refuses dense or unknown models with a `ValueError` that lists what is supported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
"""The fused experts module's two 3-D parameters (and PEFT's `target_parameters` names)."""


@dataclass(frozen=True)
class ExpertLayout:
    """How one model family stores its routed experts.

    Args:
        family: Display name, e.g. `"Qwen3-MoE"`.
        model_types: `config.model_type` values of the family.
        experts_class: Class name of the fused experts module (checked before packing).
        block_attr: Decoder-layer attribute holding the MoE block (`"mlp"`, Granite: `"block_sparse_moe"`).
        router_attr: MoE-block attribute of the router (stays on the GPU, trains there).
        shared_attrs: MoE-block attributes of shared experts (stay on the GPU).
        gate_up / down: Layout of the two 3-D parameters (`[E, 2I, H]` notation: E experts, H hidden, I intermediate).
        transposed: The parameters are `[E, H, 2I]` / `[E, I, H]` (gpt-oss).
        interleaved: Gate and up rows alternate (`x[..., ::2]`, `x[..., 1::2]`).
        bias: The experts have bias parameters (`gate_up_proj_bias`, `down_proj_bias`).
        act: Gated activation: `"silu"` or `"clamped_swiglu"` (gpt-oss, with `alpha` and `limit`).
    """

    family: str
    model_types: tuple[str, ...]
    experts_class: str
    block_attr: str = "mlp"
    router_attr: str = "gate"
    shared_attrs: tuple[str, ...] = ()
    gate_up: str = "[E, 2I, H]"
    down: str = "[E, H, I]"
    transposed: bool = False
    interleaved: bool = False
    bias: bool = False
    act: str = "silu"


REGISTRY: tuple[ExpertLayout, ...] = (
    ExpertLayout("Qwen3-MoE", ("qwen3_moe",), "Qwen3MoeExperts"),
    ExpertLayout(
        "Qwen2-MoE", ("qwen2_moe",), "Qwen2MoeExperts", shared_attrs=("shared_expert", "shared_expert_gate")
    ),
    ExpertLayout("Mixtral", ("mixtral",), "MixtralExperts"),
    ExpertLayout("OLMoE", ("olmoe",), "OlmoeExperts"),
    ExpertLayout("DeepSeek-V3", ("deepseek_v3", "kimi_k2"), "DeepseekV3Experts", shared_attrs=("shared_experts",)),
    ExpertLayout("DeepSeek-V2", ("deepseek_v2",), "DeepseekV2Experts", shared_attrs=("shared_experts",)),
    ExpertLayout("GLM4-MoE", ("glm4_moe",), "Glm4MoeExperts", shared_attrs=("shared_experts",)),
    ExpertLayout("ERNIE-4.5-MoE", ("ernie4_5_moe",), "Ernie4_5_MoeExperts", shared_attrs=("shared_experts",)),
    ExpertLayout("MiniMax-M2", ("minimax_m2",), "MiniMaxM2Experts"),
    ExpertLayout("HunYuan-V1-MoE", ("hunyuan_v1_moe",), "HunYuanMoEV1Experts", shared_attrs=("shared_mlp",)),
    ExpertLayout("Granite-MoE", ("granitemoe",), "GraniteMoeExperts", block_attr="block_sparse_moe", router_attr="router"),
    ExpertLayout(
        "gpt-oss",
        ("gpt_oss",),
        "GptOssExperts",
        router_attr="router",
        gate_up="[E, H, 2I]",
        down="[E, I, H]",
        transposed=True,
        interleaved=True,
        bias=True,
        act="clamped_swiglu",
    ),
)


def supported_families() -> list[str]:
    """Families the engine runs today, in registry order."""
    return [layout.family for layout in REGISTRY]


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "model_type", None)


def match_model_type(model: nn.Module) -> ExpertLayout | None:
    """The entry whose `model_types` contains `model.config.model_type`."""
    model_type = _model_type(model)
    return next((layout for layout in REGISTRY if model_type in layout.model_types), None)


def match_experts_class(model: nn.Module) -> ExpertLayout | None:
    """The entry whose experts class occurs in the model (covers renamed model types of one family)."""
    names = {type(module).__name__ for module in model.modules()}
    return next((layout for layout in REGISTRY if layout.experts_class in names), None)


MATCHERS = (match_model_type, match_experts_class)


def _fused_experts_classes(model: nn.Module) -> list[str]:
    found = []
    for module in model.modules():
        param = getattr(module, "gate_up_proj", None)
        if isinstance(param, torch.Tensor) and param.dim() == 3 and type(module).__name__ not in found:
            found.append(type(module).__name__)
    return found


def match_layout(model: nn.Module) -> ExpertLayout:
    """Find the registry entry for an (unwrapped) transformers model.

    Raises:
        ValueError: for a dense model, a MoE family not in the registry, or a family the engine
            cannot run yet; the message names the family and lists the supported ones.
    """
    supported = ", ".join(supported_families())
    layout = next((found for matcher in MATCHERS if (found := matcher(model)) is not None), None)
    model_type = _model_type(model)
    if layout is None:
        fused = _fused_experts_classes(model)
        if fused:
            raise ValueError(
                f"MoE family {model_type!r} ({', '.join(fused)}) is not in kt_trl's registry; supported families: "
                f"{supported}. Train it with plain trl.SFTTrainer, or add an ExpertLayout entry to "
                "kt_trl/layouts.py after checking its experts use the standard [E, 2I, H] SwiGLU layout."
            )
        raise ValueError(
            f"{type(model).__name__} (model_type {model_type!r}) has no routed experts: kt_trl moves only MoE "
            f"experts to the CPU engine. Use plain trl.SFTTrainer for dense models; supported MoE families: {supported}."
        )
    return layout


def _is_silu(act: object) -> bool:
    """True when `act` computes SiLU (transformers has two SiLU classes, so probe the values)."""
    if not callable(act):
        return False
    probe = torch.tensor([-3.0, -0.5, 0.0, 0.7, 4.0])
    with torch.no_grad():
        return bool(torch.allclose(act(probe), torch.nn.functional.silu(probe)))


def check_experts_module(layout: ExpertLayout, experts: nn.Module, *, where: str) -> None:
    """Refuse an experts module whose structure differs from what `layout` promises.

    Args:
        layout: The family's registry entry.
        experts: The base (unwrapped) fused experts module.
        where: Its qualified name, for messages.
    """
    name = type(experts).__name__
    problems = []
    if name != layout.experts_class:
        problems.append(f"class {name}, expected {layout.experts_class}")
    problems += _shape_problems(layout, getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None))
    flags = (("has_bias", layout.bias), ("is_transposed", layout.transposed),
             ("is_concatenated", not layout.interleaved), ("has_gate", True))
    for flag, expected in flags:
        if getattr(experts, flag, expected) != expected:
            problems.append(f"{flag}={getattr(experts, flag)}")
    if layout.act == "silu":
        act = getattr(experts, "act_fn", None)
        if not _is_silu(act):
            problems.append(f"activation {type(act).__name__} (config.hidden_act must be 'silu')")
    elif not all(isinstance(getattr(experts, name, None), (int, float)) for name in ("alpha", "limit")):
        problems.append("no numeric alpha / limit of the clamped SwiGLU")
    if problems and "fp8" in name.lower():   # transformers' own FP8 quantization (a GPU was visible at load)
        raise ValueError(
            f"{where} ({layout.family}) holds transformers' FP8-quantized experts ({name}), which the CPU engine does "
            "not read. Pass the checkpoint's name or directory to KTSFTTrainer (or kt_trl.load_model): its FP8 experts "
            "go into the engine as stored (KTConfig(expert_format='auto')). Or load it dequantized, "
            "from_pretrained(..., quantization_config=FineGrainedFP8Config(dequantize=True))."
        )
    if problems:
        raise ValueError(
            f"{where} ({layout.family}) does not have the experts layout the CPU engine runs for this family: "
            f"{'; '.join(problems)}. Train this model with plain trl.SFTTrainer."
        )


def _shape_problems(layout: ExpertLayout, gate_up, down) -> list[str]:
    if not (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return ["no 3-D gate_up_proj / down_proj parameters"]
    if gate_up.dim() != 3 or down.dim() != 3:
        return [f"gate_up_proj {tuple(gate_up.shape)} / down_proj {tuple(down.shape)} are not 3-D"]
    if layout.transposed:
        num_experts, hidden, two_inter = gate_up.shape
        expected_down = (num_experts, two_inter // 2, hidden)
    else:
        num_experts, two_inter, hidden = gate_up.shape
        expected_down = (num_experts, hidden, two_inter // 2)
    if tuple(down.shape) != expected_down or two_inter % 2:
        return [f"gate_up_proj {tuple(gate_up.shape)} and down_proj {tuple(down.shape)} do not form "
                f"{layout.gate_up} / {layout.down}"]
    return []


# Converters between a family's layout and the engine's standard one, one expert at a time.


def deinterleave(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Gate entries (even positions) first, then up (odd) along `dim`: a new tensor, differentiable."""
    at = (slice(None),) * dim
    return torch.cat([t[at + (slice(0, None, 2),)], t[at + (slice(1, None, 2),)]], dim=dim)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    half = t.shape[0] // 2
    out = torch.empty_like(t)
    out[0::2], out[1::2] = t[:half], t[half:]
    return out


def engine_expert(layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert in the family's layout -> `(gate_up [2I, H], down [H, I])` on the CPU."""
    gate_up, down = gate_up.detach().to("cpu"), down.detach().to("cpu")
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    if layout.interleaved:
        gate_up = deinterleave(gate_up)
    return gate_up.contiguous(), down.contiguous()


def engine_bias(layout: ExpertLayout, experts: nn.Module, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate_up_bias [2I] gate then up, down_bias [H])` of one expert, FP32 on the CPU."""
    b_gu = experts.gate_up_proj_bias.detach()[expert].to("cpu", torch.float32)
    b_d = experts.down_proj_bias.detach()[expert].to("cpu", torch.float32)
    return (deinterleave(b_gu) if layout.interleaved else b_gu).contiguous(), b_d.contiguous()


def engine_experts(layout: ExpertLayout, experts: nn.Module) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield `(gate_up [2I, H], down [H, I])` per expert in the engine's layout (CPU), with
    `(gate_up_bias [2I], down_bias [H])` appended when the family has biases."""
    for e in range(experts.gate_up_proj.shape[0]):
        weights = engine_expert(layout, experts.gate_up_proj[e], experts.down_proj[e])
        yield weights + engine_bias(layout, experts, e) if layout.bias else weights


def engine_dims(layout: ExpertLayout, experts: nn.Module) -> tuple[int, int, int]:
    """`(E, H, I)` of an experts module."""
    E, a, b = experts.gate_up_proj.shape
    return (E, a, b // 2) if layout.transposed else (E, b, a // 2)


def engine_activation(layout: ExpertLayout, experts: nn.Module) -> dict:
    """The family's activation as `ExpertEngine.from_experts` keywords (none for SiLU)."""
    if layout.act == "clamped_swiglu":
        return {"activation": "clamped_swiglu", "alpha": float(experts.alpha), "limit": float(experts.limit)}
    return {}


def hf_expert(layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert from the engine's layout back to the family's: the inverse of `engine_expert`."""
    if layout.interleaved:
        gate_up = _interleave(gate_up)
    if layout.transposed:
        gate_up, down = gate_up.t(), down.t()
    return gate_up.contiguous(), down.contiguous()


def hf_experts(layout: ExpertLayout, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts `[E, 2I, H]` / `[E, H, I]` (the engine's `unpack()`) in the family's fused layout."""
    if not (layout.transposed or layout.interleaved):
        return gate_up, down
    experts = [hf_expert(layout, gate_up[e], down[e]) for e in range(gate_up.shape[0])]
    return torch.stack([g for g, _ in experts]), torch.stack([d for _, d in experts])
