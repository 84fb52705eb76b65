"""PEFT LoRA on fused experts, computed by the CPU engine instead of PEFT.

PEFT (>= 0.17) adapts fused experts with `target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]`: two `lora.ParamWrapper`s nest around the experts module (outer = the last
one targeted, usually down_proj). Each holds, per adapter,

    lora_A.weight [r*E, in]   -> A = view(E, r, in)                     A_e = A[e]
    lora_B.weight [out, r*E]  -> B = view(out, r, E).permute(2, 0, 1)   B_e = B[e]  ([E, out, r], column k*E + e)
    delta W_e = scaling * B_e @ A_e      (for gate_up: in = H, out = 2I; for down: in = I, out = H)

PEFT's own forward materialises `W + delta W` for every expert on every call. We never run it: the
outer wrapper *instance* gets a bound forward that hands `ExpertLoRA` views of the same parameters to
the engine, so the optimizer, `save_pretrained` and `PeftModel.from_pretrained` keep working.
Every expert wrapper also gets a bound `merge` / `unmerge` that add / subtract `delta W_e` in the
engine's packed weights (PEFT's own would write into the zero-byte placeholders), so
`merge_adapter()` and `merge_and_unload()` work and the merged model saves its merged experts.
"""

from __future__ import annotations

import logging
import types
import warnings

import torch
from torch import nn

from .containers import MoEBlock
from .engine import ExpertLoRA
from .layouts import EXPERT_PARAMETERS, ExpertLayout, deinterleave

logger = logging.getLogger(__name__)



def requested_expert_lora(peft_config) -> bool:
    """Whether a PEFT config asks for LoRA on the routed experts.

    True for `target_parameters` naming an expert parameter, and for `target_modules="all-linear"`
    (PEFT maps it onto the fused experts for most families; where it does not, the user must hear it).
    """
    if peft_config is None:
        return False
    params = getattr(peft_config, "target_parameters", None) or ()
    if any(str(p).rsplit(".", 1)[-1] in EXPERT_PARAMETERS for p in params):
        return True
    modules = getattr(peft_config, "target_modules", None)
    return isinstance(modules, str) and modules.lower() == "all-linear"


def expert_lora_factors(wrapper: nn.Module, adapter: str):
    """`ExpertLoRA` (`A [E, r, in]`, `B [E, out, r]`, scale) of one `ParamWrapper` adapter, in the
    engine's output order: views of PEFT's tensors, except where the family interleaves gate and up
    outputs (gpt-oss), whose gate_up `B` is a (differentiable) copy with the gate rows first."""
    num_experts, rank = wrapper.num_experts, wrapper.r[adapter]
    weight_a = wrapper.lora_A[adapter].weight  # [r*E, in]
    weight_b = wrapper.lora_B[adapter].weight  # [out, r*E]
    a = weight_a.view(num_experts, rank, weight_a.shape[1])
    b = weight_b.view(weight_b.shape[0], rank, num_experts).permute(2, 0, 1)
    if getattr(wrapper, "_kt_interleaved", False) and wrapper.parameter_name == "gate_up_proj":
        b = deinterleave(b, dim=1)
    return ExpertLoRA(A=a, B=b, scale=float(wrapper.scaling[adapter]))


def _active_adapter(wrapper: nn.Module) -> str | None:
    active = [name for name in wrapper.active_adapters if name in wrapper.lora_A]
    if len(active) > 1:
        raise ValueError(
            f"{len(active)} adapters {active} are active on CPU-routed experts; the engine runs one. "
            "Activate one with model.set_adapter(name)."
        )
    return active[0] if active else None


def _routed_lora_forward(self: nn.Module, hidden_states, top_k_index, top_k_weights):
    """Forward bound on PEFT's outer expert `ParamWrapper`: the engine computes base + LoRA.

    As PEFT's own forward: disabled adapters are unmerged first; a merged adapter is in the
    engine's weights already, so only unmerged ones are passed as LoRA.
    """
    wrappers = self._kt_wrappers
    experts = self.get_base_layer()
    loras = {}
    for name, wrapper in wrappers.items():
        if self.disable_adapters and wrapper.merged:
            wrapper.unmerge()
        adapter = None if self.disable_adapters or wrapper.merged else _active_adapter(wrapper)
        if adapter is not None:
            loras[name] = expert_lora_factors(wrapper, adapter)
    return experts._kt_runner(
        hidden_states, top_k_index, top_k_weights,
        lora_gate_up=loras.get("gate_up_proj"), lora_down=loras.get("down_proj"),
    )


def _merge_into_engine(self: nn.Module, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
    """`ParamWrapper.merge` for CPU-routed experts: `W_e += scale * B_e A_e` in the engine, layer by layer.

    PEFT's own merge adds to the parameter, which here is a zero-byte placeholder.
    """
    from peft.tuners.tuners_utils import check_adapters_to_merge

    for adapter in check_adapters_to_merge(self, adapter_names):
        if adapter in self.lora_A:
            _add_delta_to_engine(self, adapter, sign=1.0, check_finite=safe_merge)
            self.merged_adapters.append(adapter)


def _unmerge_from_engine(self: nn.Module) -> None:
    """`ParamWrapper.unmerge` for CPU-routed experts (subtracts what `_merge_into_engine` added)."""
    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    while self.merged_adapters:
        adapter = self.merged_adapters.pop()
        if adapter in self.lora_A:
            _add_delta_to_engine(self, adapter, sign=-1.0, check_finite=False)


def _add_delta_to_engine(wrapper: nn.Module, adapter: str, *, sign: float, check_finite: bool) -> None:
    runner = wrapper.get_base_layer()._kt_runner
    if runner.engine.format != "bf16":
        logger.warning("kt_trl: merging into the %s experts of %s: 8-bit codes cannot hold W + s·B·A, so this layer's "
                       "experts become BF16 (their dequantized weights plus the delta, twice the host memory).",
                       runner.engine.format.upper(), runner.name)
        runner.engine = runner.engine.as_bf16()
    elif runner.engine.shared:   # the host's other ranks compute with these pages: merge into a private copy
        logger.warning("kt_trl: merging into %s, whose experts this host's ranks share: this rank's layer gets its "
                       "own copy first.", runner.name)
        runner.engine = runner.engine.as_bf16()
    engine = runner.engine
    lora = expert_lora_factors(wrapper, adapter)
    gate_up, down = engine.unpack()  # this layer only: [E, 2I, H], [E, H, I] bf16
    target = gate_up if wrapper.parameter_name == "gate_up_proj" else down
    with torch.no_grad():
        for e in range(engine.num_experts):
            # [out, in] = [out, r] @ [r, in], in FP32, rounded to BF16 once
            merged = target[e].float() + sign * lora.scale * (lora.B[e].float() @ lora.A[e].float())
            if check_finite and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            target[e] = merged.to(target.dtype)
            engine.load_expert(e, gate_up[e], down[e])


def _check_wrappers(block: MoEBlock, layout: ExpertLayout) -> dict[str, nn.Module]:
    by_name = {w.parameter_name: w for w in block.wrappers}
    unknown = sorted(set(by_name) - set(EXPERT_PARAMETERS))
    if unknown or len(by_name) != len(block.wrappers):
        raise ValueError(
            f"{block.name}: LoRA on expert parameter(s) {unknown or list(by_name)} is not supported by the CPU "
            f"engine; target only {list(EXPERT_PARAMETERS)} in target_parameters."
        )
    for name, wrapper in by_name.items():
        # PEFT reads a 3-D parameter as [E, in, out] and swaps to [E, out, in] where the model stores
        # experts that way: either way A is [r*E, in] and B [out, r*E] of x -> out.
        if getattr(wrapper, "_did_swap_in_out_features", False) == layout.transposed:
            raise ValueError(f"{block.name}.{name}: PEFT's in / out features do not match the {layout.family} "
                             "expert layout; the CPU engine cannot run this LoRA.")
        if any(wrapper.lora_bias.get(a, False) for a in wrapper.lora_A):
            raise ValueError(f"{block.name}.{name}: lora_bias=True is not supported on experts; set lora_bias=False.")
    return by_name


def _to_fp32_cpu(wrapper: nn.Module) -> None:
    """Expert LoRA masters live in host memory in FP32 (the engine's input format)."""
    for param in wrapper.lora_A.parameters():
        if param.dtype != torch.float32 or param.device.type != "cpu":
            param.data = param.data.to("cpu", torch.float32)
    for param in wrapper.lora_B.parameters():
        if param.dtype != torch.float32 or param.device.type != "cpu":
            param.data = param.data.to("cpu", torch.float32)


def bind_expert_lora(block: MoEBlock, layout: ExpertLayout) -> bool:
    """Bind the engine-backed forward on `block`'s outer `ParamWrapper` (idempotent).

    Returns:
        True when the block has expert LoRA wrappers (bound now or before).
    """
    if not block.wrappers:
        return False
    outer = block.wrappers[0]
    if getattr(outer, "_kt_routed", False):
        return True
    by_name = _check_wrappers(block, layout)
    for wrapper in by_name.values():
        _to_fp32_cpu(wrapper)
        wrapper._kt_interleaved = layout.interleaved
        wrapper.merge = types.MethodType(_merge_into_engine, wrapper)
        wrapper.unmerge = types.MethodType(_unmerge_from_engine, wrapper)
    outer._kt_wrappers = by_name
    outer.forward = types.MethodType(_routed_lora_forward, outer)
    outer._kt_routed = True
    return True
