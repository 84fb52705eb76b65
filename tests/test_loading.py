"""load_model against transformers' own from_pretrained + prepare_model, on checkpoints transformers writes.

The reference needs nothing of kt_trl's loader: `save_pretrained` writes each tiny model (sharded with
a small `max_shard_size`, and in one file), plain `from_pretrained` loads it and `prepare_model` packs
its experts. The streamed model must hold the same engines (bitwise: the helpers round expert
weights to BF16, what the engine holds), the same non-expert tensors and buffers, and give the same
logits; the trainer fed the directory must train like the trainer fed the loaded model.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from kt_trl import KTConfig, KTSFTTrainer, load_model
from kt_trl.checkpoint_keys import dequantize_fp8
from kt_trl.prepare import prepare_model
from tests.helpers import FAMILIES, VOCAB, expert_targets, sft_args, step_losses, tiny_config, tiny_model

pytestmark = pytest.mark.usefixtures("cpu_only")  # load_model / plan on a GPU host place experts there

FROZEN = KTConfig(freeze_experts=True)
EXPERT_NAMES = ("gate_up_proj", "down_proj")


def write(model, path, *, sharded: bool):
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "10GB")
    assert (path / "model.safetensors.index.json").is_file() == sharded
    return path


def engines(model):
    return {name: module._kt_runner.engine for name, module in model.named_modules() if hasattr(module, "_kt_runner")}


def installed_engines(model):
    """The engines `load_model` installed, before preparation takes them."""
    return {name: module._kt_engine for name, module in model.named_modules() if hasattr(module, "_kt_engine")}


def non_expert_state(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith(tuple(f"experts.{n}" for n in EXPERT_NAMES))}


def logits(model, seed=0):
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_model(streamed, reference):
    prepare_model(streamed, FROZEN)
    prepare_model(reference, FROZEN)
    ours, theirs = engines(streamed), engines(reference)
    assert ours.keys() == theirs.keys() and ours
    for name, engine in ours.items():
        for a, b in zip(engine.unpack(), theirs[name].unpack()):
            assert torch.equal(a, b), name
    expected = non_expert_state(reference)
    state = non_expert_state(streamed)
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key
    for (name, a), (_, b) in zip(streamed.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(streamed), logits(reference))


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "one-file"])
@pytest.mark.parametrize("family", [*sorted(FAMILIES), "gpt_oss"])   # gpt-oss: fused, transposed, biased on disk
def test_streamed_model_equals_from_pretrained(family, sharded, tmp_path):
    path = write(tiny_model(family), tmp_path / "ckpt", sharded=sharded)
    streamed = load_model(path)
    for name, module in streamed.named_modules():   # the engines are installed, the HF tensors released
        if type(module).__name__.endswith("Experts"):
            assert hasattr(module, "_kt_engine") and all(getattr(module, n).stride() == (0, 0, 0) for n in EXPERT_NAMES)
    assert streamed.config._name_or_path == str(path)
    assert_same_model(streamed, AutoModelForCausalLM.from_pretrained(path))


def test_dtype_is_honoured(tmp_path):
    path = write(tiny_model("qwen3_moe").to(torch.bfloat16), tmp_path / "ckpt", sharded=True)
    assert load_model(path).dtype == torch.bfloat16   # "auto": the config's dtype
    streamed = load_model(path, dtype=torch.float32)
    assert streamed.dtype == torch.float32
    assert_same_model(streamed, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "granitemoe", "gpt_oss"])
def test_save_pretrained_writes_the_checkpoint_keys_again(family, tmp_path):
    original = tiny_model(family)
    path = write(original, tmp_path / "ckpt", sharded=False)
    streamed = load_model(path)
    streamed.save_pretrained(tmp_path / "again")
    saved = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert saved.keys() == load_file(str(path / "model.safetensors")).keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "again")  # plain transformers
    for key, value in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


@pytest.mark.parametrize("gpu_experts, on_device", [("auto", ()), (8, (0,))])
def test_trainer_from_directory_trains_like_from_pretrained(gpu_experts, on_device, tmp_path, tokenizer, dataset):
    from peft import LoraConfig

    path = write(tiny_model("qwen3_moe"), tmp_path / "ckpt", sharded=True)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("qwen3_moe"))
    losses = []
    for name, model in (("dir", str(path)), ("model", AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))):
        trainer = KTSFTTrainer(model, sft_args(tmp_path / name, max_steps=2), dataset,
                               processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(lora),
                               kt_config=KTConfig(gpu_experts=gpu_experts))
        trainer.train()
        losses.append(step_losses(trainer))
        assert trainer.kt_report.expert_lora_parameters > 0 and trainer.kt_report.gpu_layers == on_device
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_layers_kept_on_the_device_are_read_into_their_parameters(tmp_path):
    """gpu_experts=8 keeps layer 0 (8 experts) in transformers' path: load_model reads it there, dense."""
    path = write(tiny_model("qwen3_moe"), tmp_path / "ckpt", sharded=True)
    config = KTConfig(freeze_experts=True, gpu_experts=8)
    streamed, reference = load_model(path, kt_config=config), AutoModelForCausalLM.from_pretrained(path)
    kept, packed = (streamed.get_submodule(f"model.layers.{i}.mlp.experts") for i in (0, 1))
    assert not hasattr(kept, "_kt_engine") and hasattr(packed, "_kt_engine")
    for name in EXPERT_NAMES:
        assert torch.equal(getattr(kept, name), reference.get_parameter(f"model.layers.0.mlp.experts.{name}")), name
    assert prepare_model(streamed, config).gpu_layers == prepare_model(reference, config).gpu_layers == (0,)
    for name, engine in engines(streamed).items():
        for a, b in zip(engine.unpack(), engines(reference)[name].unpack()):
            assert torch.equal(a, b), name
    assert torch.equal(logits(streamed), logits(reference))


def test_a_gpt_oss_directory_trains_like_from_pretrained(tmp_path, tokenizer, dataset):
    from peft import LoraConfig

    path = write(tiny_model("gpt_oss"), tmp_path / "ckpt", sharded=True)
    losses = []
    for name, model in (("dir", str(path)), ("model", AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))):
        trainer = KTSFTTrainer(model, sft_args(tmp_path / name, "gpt_oss", max_steps=2), dataset,
                               processing_class=copy.deepcopy(tokenizer),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
        trainer.train()
        losses.append(step_losses(trainer))
        assert trainer.kt_report.layers_routed == (0, 1)
    assert len(losses[0]) == 2 and losses[0] == losses[1]


def test_trainer_honours_model_init_kwargs(tmp_path, tokenizer, dataset):
    path = write(tiny_model("mixtral"), tmp_path / "ckpt", sharded=False)
    args = sft_args(tmp_path / "run", "mixtral", max_steps=1, model_init_kwargs={"dtype": "bfloat16"})
    trainer = KTSFTTrainer(str(path), args, dataset, processing_class=copy.deepcopy(tokenizer), kt_config=FROZEN)
    assert trainer.model.dtype == torch.bfloat16 and trainer.kt_report.layers_routed == (0, 1)
    assert args.model_init_kwargs == {"dtype": "bfloat16"}   # the caller's args are left as they were
    trainer.train()


# Memory and the page cache.

_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch, transformers
    from kt_trl import KTConfig, load_model
    from kt_trl.engine import ExpertEngine
    def peak():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
    ExpertEngine(torch.zeros(1, 32, 32), torch.zeros(1, 32, 16))   # imports and the library before the baseline
    if torch.cuda.is_available():   # the plan reads free GPU memory: the CUDA context's host memory is no expert
        torch.cuda.mem_get_info()
    with torch.device("meta"):
        transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(sys.argv[1]))
    before = peak()
    model = load_model(sys.argv[1], kt_config=KTConfig(gpu_experts="none"))   # every expert in the engine
    packed = sum(m._kt_engine.packed_bytes for m in model.modules() if hasattr(m, "_kt_engine"))
    print(json.dumps({"delta": peak() - before, "packed": packed}))
""")


def test_experts_are_never_materialised_whole(tmp_path):
    # 2 MoE layers of 64 experts [2I, H] = [512, 512]: 50 MB of BF16 experts per layer, little else.
    config = tiny_config("qwen3_moe", hidden_size=512, moe_intermediate_size=256, num_experts=64, dtype="bfloat16")
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layer_bytes = 64 * 3 * 512 * 256 * 2
    tensors = {}
    for name, param in meta.named_parameters():
        tensors[name] = torch.full(param.shape, 0.01, dtype=torch.bfloat16)
    from transformers.core_model_loading import revert_weight_conversion

    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in revert_weight_conversion(meta, tensors).items()},
              str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(tmp_path / "ckpt")
    del tensors
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "ckpt")], capture_output=True,
                         text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["packed"] >= 2 * layer_bytes
    # from_pretrained holds every expert once more (fused) before packing; here a few experts are in flight.
    assert result["delta"] < result["packed"] + layer_bytes // 2, result


def _resident_fraction(path) -> float:
    """The part of `path` that is in the page cache (mincore over a read-only mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    address = libc.mmap(None, size, 1, 1, fd, 0)   # PROT_READ, MAP_SHARED
    os.close(fd)
    pages = (size + 4095) // 4096
    vector = (ctypes.c_ubyte * pages)()
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) == 0
    libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
    return sum(v & 1 for v in vector) / pages


def test_each_shard_leaves_the_page_cache(tmp_path):
    path = write(tiny_model("qwen3_moe", hidden_size=256, moe_intermediate_size=128), tmp_path / "ckpt", sharded=True)
    os.sync()   # written pages are dirty until then, and dirty pages are not dropped
    shards = sorted(path.glob("model-*.safetensors"))
    expert_only = [s for s in shards if all(".experts." in k for k in safe_open(str(s), "pt").keys())]
    for shard in shards:
        shard.read_bytes()
    assert expert_only and min(_resident_fraction(s) for s in shards) > 0.9
    model = load_model(path)
    # the other shards hold tensors that stay views of the mapped files (as from_pretrained leaves them)
    assert max(_resident_fraction(s) for s in expert_only) < 0.1
    del model


# FP8 checkpoints (DeepSeek-V3 / Kimi-K2 layout).


def quantize_fp8(weight: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`float8_e4m3fn` weights and one FP32 `weight_scale_inv` per `block x block` block (the last ones partial)."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // block) * block, -(-cols // block) * block)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return quantized.contiguous(), scale.contiguous()


def write_fp8(path, block: int) -> dict[str, torch.Tensor]:
    """A tiny DeepSeek-V3 in FP8: every `*_proj*` matrix quantized; returns what it stores."""
    tiny_model("deepseek_v3").to(torch.bfloat16).save_pretrained(path)
    stored = {}
    for key, value in load_file(str(path / "model.safetensors")).items():
        if value.dim() == 2 and "_proj" in key:
            stored[key], stored[f"{key}_scale_inv"] = quantize_fp8(value, block)
        else:
            stored[key] = value
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block], "fmt": "e4m3",
                                     "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(config))
    return stored


def test_fp8_experts_equal_the_dequantized_weights(tmp_path, caplog):
    stored = write_fp8(tmp_path / "fp8", block=8)   # kv_a_proj_with_mqa [20, 32]: partial 8 x 8 blocks
    with caplog.at_level("WARNING", logger="kt_trl"):
        model = load_model(tmp_path / "fp8")
    # 8-column scale blocks: the engine's FP8 needs multiples of 16, so "auto" dequantizes (and says so)
    assert "cannot go to the engine as stored (scale blocks of 8 columns" in caplog.text
    assert {engine.format for engine in installed_engines(model).values()} == {"bf16"}
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.bfloat16

    def dequantized(key):
        return dequantize_fp8(stored[key], stored[f"{key}_scale_inv"], (8, 8)).to(torch.bfloat16)

    state = model.state_dict()   # the engines' experts, unpacked, in the model's layout
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        for e in range(8):
            gate_up = torch.cat([dequantized(f"{prefix}.{e}.{p}_proj.weight") for p in ("gate", "up")])
            assert torch.equal(state[f"{prefix}.gate_up_proj"][e], gate_up)
            assert torch.equal(state[f"{prefix}.down_proj"][e], dequantized(f"{prefix}.{e}.down_proj.weight"))
    for key in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                "model.layers.1.mlp.shared_experts.up_proj.weight"):
        assert torch.equal(state[key], dequantized(key))


def test_fp8_experts_stay_fp8_in_the_engine_and_compute_as_dequantized(tmp_path):
    write_fp8(tmp_path / "fp8", block=16)
    kept = load_model(tmp_path / "fp8")   # "auto": the codes and block scales as stored
    dequantized = load_model(tmp_path / "fp8", kt_config=KTConfig(expert_format="bf16"))
    fp8_engines, bf16_engines = installed_engines(kept), installed_engines(dequantized)
    assert {(e.format, e.block_k) for e in fp8_engines.values()} == {("fp8", 16)}
    for name, engine in fp8_engines.items():
        assert engine.packed_bytes < 0.6 * bf16_engines[name].packed_bytes
    assert_same_model(kept, dequantized)   # the same weights, bit for bit, and the same logits


def test_fp8_layers_kept_on_the_device_hold_the_dequantized_weights(tmp_path):
    stored = write_fp8(tmp_path / "fp8", block=16)
    model = load_model(tmp_path / "fp8", kt_config=KTConfig(gpu_experts=8))   # layer 1 of MoE layers 1, 2
    kept = model.get_submodule("model.layers.1.mlp.experts")
    assert not hasattr(kept, "_kt_engine") and kept.gate_up_proj.dtype == torch.bfloat16
    assert {(e.format, e.block_k) for e in installed_engines(model).values()} == {("fp8", 16)}

    def dequantized(key):
        return dequantize_fp8(stored[key], stored[f"{key}_scale_inv"], (16, 16)).to(torch.bfloat16)

    for e in range(8):
        prefix = f"model.layers.1.mlp.experts.{e}"
        gate_up = torch.cat([dequantized(f"{prefix}.{p}_proj.weight") for p in ("gate", "up")])
        assert torch.equal(kept.gate_up_proj[e], gate_up)
        assert torch.equal(kept.down_proj[e], dequantized(f"{prefix}.down_proj.weight"))


def test_fp8_and_int8_experts_train(tmp_path, tokenizer, dataset):
    from peft import LoraConfig

    write_fp8(tmp_path / "fp8", block=16)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], target_parameters=expert_targets("deepseek_v3"))
    losses, reports = {}, {}
    for format in ("auto", "bf16", "int8"):
        trainer = KTSFTTrainer(str(tmp_path / "fp8"), sft_args(tmp_path / format, "deepseek_v3", max_steps=3), dataset,
                               processing_class=copy.deepcopy(tokenizer), peft_config=copy.deepcopy(lora),
                               kt_config=KTConfig(expert_format=format))
        trainer.train()
        losses[format], reports[format] = step_losses(trainer), trainer.kt_report
    assert reports["auto"].expert_format == "fp8" and reports["int8"].expert_format == "int8"
    assert len(losses["auto"]) == 3 and losses["auto"] == losses["bf16"]   # FP8 codes = their dequantized BF16
    for ours, theirs in zip(losses["int8"], losses["bf16"]):   # INT8 re-quantizes those weights: close, not equal
        assert abs(ours - theirs) <= 0.02 * theirs


def test_fp8_matches_transformers_dequantization(tmp_path):
    from transformers import FineGrainedFP8Config

    write_fp8(tmp_path / "fp8", block=4)   # every matrix a whole number of blocks: transformers' own path loads it
    # dequantize=True: where a GPU is visible transformers would otherwise keep FP8 weights (its FP8Experts)
    dequantized = FineGrainedFP8Config(weight_block_size=(4, 4), dequantize=True)
    assert_same_model(load_model(tmp_path / "fp8", kt_config=KTConfig(expert_format="bf16")),
                      AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", quantization_config=dequantized))


# Clear errors.


def test_missing_shard(tmp_path):
    path = write(tiny_model("qwen3_moe"), tmp_path / "ckpt", sharded=True)
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(FileNotFoundError, match="shard.*missing"):
        load_model(path)


def test_no_safetensors(tmp_path):
    tiny_model("qwen3_moe").save_pretrained(tmp_path, safe_serialization=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        load_model(tmp_path)


def test_expert_keys_the_mapping_cannot_place(tmp_path):
    path = write(tiny_model("qwen3_moe"), tmp_path / "ckpt", sharded=False)
    config = json.loads((path / "config.json").read_text())
    config["num_local_experts"] = 6   # the checkpoint has 8
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"cannot place 12 expert tensor.*experts\.6\."):
        load_model(path)
    config["num_local_experts"] = 10
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks 12 expert tensor"):
        load_model(path)


def test_families_the_loader_refuses(tmp_path):
    import transformers

    dense = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)
    transformers.AutoModelForCausalLM.from_config(dense).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no routed experts"):
        load_model(tmp_path / "dense")


# gpt-oss's MXFP4 checkpoints.

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[E, R, C]` -> OpenAI's `blocks [E, R, C/32, 16]` (two E2M1 codes a byte, low nibble first) and
    `scales [E, R, C/32]` (exponent + 127), the nearest code for each value."""
    E, R, C = weight.shape
    groups = weight.float().reshape(E, R, C // 32, 32)
    exponent = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=2.0 ** -100) / 6.0))
    codes = ((groups / torch.exp2(exponent)[..., None])[..., None] - FP4).abs().argmin(-1).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def write_mxfp4(path):
    """A tiny gpt-oss with its experts in MXFP4, laid out as the published checkpoints are."""
    tiny_model("gpt_oss", intermediate_size=32).to(torch.bfloat16).save_pretrained(path)
    stored = {}
    for key, value in load_file(str(path / "model.safetensors")).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):   # the parameter is [E, C, R]
            stored[f"{key}_blocks"], stored[f"{key}_scales"] = quantize_mxfp4(value.transpose(1, 2))
        else:
            stored[key] = value
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))


def test_mxfp4_experts_equal_transformers_dequantization(tmp_path):
    from transformers import Mxfp4Config

    write_mxfp4(tmp_path / "mxfp4")
    streamed = load_model(tmp_path / "mxfp4", dtype=torch.bfloat16)
    assert getattr(streamed.config, "quantization_config", None) is None
    assert {engine.format for engine in installed_engines(streamed).values()} == {"bf16"}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "mxfp4", dtype=torch.bfloat16,
                                                     quantization_config=Mxfp4Config(dequantize=True))
    state = streamed.state_dict()   # the engines' experts, unpacked, in gpt-oss's layout
    for key, value in reference.state_dict().items():
        assert torch.equal(state[key], value), key
    assert_same_model(streamed, reference)


def test_mxfp4_layers_kept_on_the_device_hold_the_dequantized_weights(tmp_path):
    write_mxfp4(tmp_path / "mxfp4")
    split = load_model(tmp_path / "mxfp4", dtype=torch.bfloat16, kt_config=KTConfig(gpu_experts=8))
    packed = load_model(tmp_path / "mxfp4", dtype=torch.bfloat16)
    kept = split.get_submodule("model.layers.0.mlp.experts")
    assert not hasattr(kept, "_kt_engine") and hasattr(split.get_submodule("model.layers.1.mlp.experts"), "_kt_engine")
    for name in EXPERT_NAMES:
        assert torch.equal(getattr(kept, name), packed.state_dict()[f"model.layers.0.mlp.experts.{name}"]), name


def test_refused_arguments_and_formats(tmp_path):
    path = write(tiny_model("qwen3_moe"), tmp_path / "ckpt", sharded=False)
    with pytest.raises(ValueError, match="device_map"):
        load_model(path, device_map="auto")
    assert load_model(path, device_map="cpu").device.type == "cpu"
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized with 'awq'"):
        load_model(path)
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    stored = load_file(str(path / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    stored[key] = stored[key].to(torch.float8_e4m3fn)
    save_file(stored, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="q_proj.weight is stored in FP8.*no quantization_config"):
        load_model(path)


def test_hub_id_downloads_configs_then_weights(tmp_path, monkeypatch):
    import huggingface_hub

    path = write(tiny_model("qwen3_moe"), tmp_path / "snapshot", sharded=True)
    calls = []

    def snapshot_download(repo_id, *, allow_patterns, **kwargs):   # offline stand-in for the Hub
        calls.append((repo_id, tuple(allow_patterns), kwargs))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model = load_model("org/tiny-moe", revision="main")
    assert [c[1] for c in calls] == [("*.json",), ("*.json", "*.safetensors", "tokenizer.model", "*.tiktoken",
                                                  "*.txt", "*.jinja")]
    assert all(c[0] == "org/tiny-moe" and c[2] == {"revision": "main"} for c in calls)
    assert model.config._name_or_path == "org/tiny-moe"
    assert_same_model(model, AutoModelForCausalLM.from_pretrained(path))
