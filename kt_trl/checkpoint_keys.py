"""A checkpoint's keys: which file holds each, which fused expert parameter, expert and rows each
fills, and reading them (FP8 dequantized).

[NOTE] transformers 5 keeps a layer's routed experts fused (`gate_up_proj [E, 2I, H]`,
`down_proj [E, H, I]`), while most checkpoints store one weight per expert and projection
(`experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1.weight`) and a few
(Granite, gpt-oss) store them fused under their own names. Those names and the gate/up split
live in transformers' conversion mapping, so they are not spelled out here:
`revert_weight_conversion` (what `save_pretrained` runs) is applied to a probe whose values are
the fused parameter's row indices, and each tensor it returns says which expert and which rows
its checkpoint key holds. `kt_trl.loading` streams experts from disk by this map;
`kt_trl.per_expert_adapter` names per-expert LoRA modules by it.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .containers import MoEBlock
from . import mxfp4 as mxfp4_format
from .layouts import EXPERT_PARAMETERS


@dataclass(frozen=True)
class CheckpointRows:
    """The rows of a fused expert parameter `[E, A, B]` that one checkpoint tensor holds.

    Attributes:
        expert: The expert whose rows the tensor `[len(rows), B]` holds; `None` when the checkpoint
            keeps every expert in one tensor `[E, len(rows), B]` (expert `e` is its `[e]`).
        rows: Indices along the fused parameter's dim 1 (`A`), in the tensor's row order.
    """

    expert: int | None
    rows: torch.Tensor


def checkpoint_rows(model: nn.Module, fused_key: str, shape) -> dict[str, CheckpointRows]:
    """Checkpoint key -> the expert and rows it holds, for one fused parameter of `model`.

    Args:
        model: The (unwrapped) transformers model, real or on the meta device.
        fused_key: The parameter's name in `model`, e.g. `"model.layers.0.mlp.experts.gate_up_proj"`.
        shape: Its shape `[E, A, B]`.

    Raises:
        ValueError: when transformers' conversion changes the input columns, mixes experts in one
            tensor, or drops or repeats rows.
    """
    from transformers.core_model_loading import revert_weight_conversion

    E, A = shape[0], shape[1]
    # Two equal input columns: a one-column probe would come back squeezed.
    probe = torch.arange(E * A, dtype=torch.float64).view(E, A, 1).expand(E, A, 2)
    split = revert_weight_conversion(model, {fused_key: probe})
    found, seen = {}, np.zeros(E * A, dtype=bool)
    # numpy, not torch, for the many small tensors that come back (E per projection): torch's per-op
    # overhead made this 3x slower, 2.7 s for a 48-layer model.
    for key, tensor in split.items():
        ids = _probe_ids(tensor)
        entry = None if ids is None or ids.max() >= E * A else _rows_of(ids, E, A)
        if entry is None or seen[ids.ravel()].any():
            raise ValueError(
                f"transformers saves {fused_key} {list(shape)} as {sorted(split)[:3]}..., which kt_trl cannot map "
                "to experts and rows (the conversion changes the input columns or mixes experts)."
            )
        seen[ids.ravel()] = True
        found[key] = entry
    if not seen.all():
        raise ValueError(f"transformers' checkpoint conversion of {fused_key} drops rows; kt_trl cannot map it.")
    return found


def _probe_ids(tensor: torch.Tensor) -> np.ndarray | None:
    """The probe's row ids (`[n]` or, fused, `[E, n]`), or None if its two columns did not survive."""
    if tensor.dim() not in (2, 3) or tensor.shape[-1] != 2 or tensor.numel() == 0:
        return None
    values = tensor.detach().cpu().numpy()
    if not np.array_equal(values[..., 0], values[..., 1]):
        return None
    return values[..., 0].astype(np.int64)


def _rows_of(ids: np.ndarray, E: int, A: int) -> CheckpointRows | None:
    experts = ids // A
    if ids.ndim == 1:  # one expert's rows
        expert = int(experts[0])
        return CheckpointRows(expert, torch.from_numpy(ids % A)) if bool((experts == expert).all()) else None
    rows = ids[0] % A  # fused on disk: every expert at [e], the same rows
    same = np.array_equal(ids % A, np.broadcast_to(rows, ids.shape))
    ordered = ids.shape[0] == E and np.array_equal(experts, np.broadcast_to(np.arange(E)[:, None], ids.shape))
    return CheckpointRows(None, torch.from_numpy(rows)) if same and ordered else None


@dataclass(frozen=True)
class ExpertSource:
    """One checkpoint tensor that fills rows of one expert of a fused parameter.

    Attributes:
        key: The checkpoint key.
        index: `None` for a per-expert tensor; for a fused one, the expert to read (`tensor[index]`).
        rows: Rows of the expert's `[A, B]` slice it fills.
    """

    key: str
    index: int | None
    rows: torch.Tensor


@dataclass(frozen=True)
class LayerSources:
    """Where one MoE layer's experts are in the checkpoint.

    Attributes:
        module: The model's name of the layer's fused experts module.
        sources: Per fused parameter (`EXPERT_PARAMETERS` order), per expert, the tensors that fill it.
    """

    module: str
    sources: tuple[tuple[tuple[ExpertSource, ...], ...], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Model names of the fused parameters."""
        return tuple(f"{self.module}.{param}" for param in EXPERT_PARAMETERS)

    @property
    def keys(self) -> set[str]:
        """Every checkpoint key the layer's experts are read from."""
        return {s.key for per_param in self.sources for per_expert in per_param for s in per_expert}


def layer_sources(model: nn.Module, blocks: list[MoEBlock]) -> list[LayerSources]:
    """The checkpoint tensors of every MoE layer's experts, by `checkpoint_rows`."""
    names = {id(module): name for name, module in model.named_modules()}
    layers = []
    for block in blocks:
        layer = LayerSources(names[id(block.experts)], ())
        per_param = []
        for name, param in zip(layer.names, EXPERT_PARAMETERS):
            shape = getattr(block.experts, param).shape
            per_expert = [[] for _ in range(shape[0])]
            for key, entry in checkpoint_rows(model, name, shape).items():
                for e in range(shape[0]) if entry.expert is None else (entry.expert,):
                    per_expert[e].append(ExpertSource(key, e if entry.expert is None else None, entry.rows))
            per_param.append(tuple(tuple(sources) for sources in per_expert))
        layers.append(LayerSources(layer.module, tuple(per_param)))
    return layers


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file holding it (sharded `model.safetensors.index.json` or
    one `model.safetensors`).

    Raises:
        FileNotFoundError: for a shard the index lists that is not there, or no safetensors weights.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{directory}: {len(missing)} shard(s) listed in model.safetensors.index.json are missing, e.g. "
                f"{missing[:3]}; the download or copy is incomplete: fetch them again."
            )
        return {key: directory / name for key, name in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        return dict.fromkeys(_read_header(single), single)
    found = sorted(p.name for p in directory.iterdir())[:6] if directory.is_dir() else []
    raise FileNotFoundError(
        f"{directory} has no model.safetensors nor model.safetensors.index.json (found {found}): load_model streams "
        "safetensors checkpoints. Load this one with AutoModelForCausalLM.from_pretrained and pass the model to "
        "KTSFTTrainer, or save it again with save_pretrained (safetensors)."
    )


_EXPERT_KEY = re.compile(r"\.experts\.\d+\.")


def unplaced_expert_keys(checkpoint_keys, layers: list[LayerSources]) -> list[str]:
    """Checkpoint keys that look like one expert's weight (`.experts.{e}.`) but fill no expert of
    the model: more experts than the config says, MoE weights in a layer it makes dense, or a
    naming transformers' conversion does not produce. They would be dropped silently."""
    placed = set().union(*(layer.keys for layer in layers)) if layers else set()
    return sorted(k for k in checkpoint_keys if _EXPERT_KEY.search(f".{k}") and k not in placed
                  and not k.endswith(("_scale_inv", "activation_scale")))


# Reading the shards.

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "U8": torch.uint8}
_FLOATS = ("BF16", "F16", "F32", "F64")


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes are in its safetensors file (absolute offsets)."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _read_header(path: Path) -> dict[str, _Entry]:
    """The safetensors header: an 8-byte little-endian length, then JSON with each tensor's data offsets."""
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    base = 8 + size
    return {key: _Entry(v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
            for key, v in header.items() if key != "__metadata__"}


class Shards:
    """The checkpoint's safetensors files; FP8 and MXFP4 weights dequantized as read.

    Experts are read with `os.preadv` into buffers the caller reuses, not through `safe_open`:
    safetensors maps the file and its tensors are views of the mapping, so every page an expert
    touches would stay in the process's RSS (and out of reach of `POSIX_FADV_DONTNEED`) until
    the file is closed, a whole shard of experts at a time. Non-expert tensors go to
    `from_pretrained` as `safe_open` slices, as transformers reads them itself.

    Args:
        files: Checkpoint key -> file (`checkpoint_files`).
        fp8: Whether the config says FP8 (`quantization_config`), weights beside a `weight_scale_inv`.
        fp8_block: `(rows, cols)` of one scale's block (`None`: one scale per tensor).
        mxfp4: Whether the config says MXFP4 (gpt-oss): each `<name>_blocks` / `<name>_scales` pair is
            read as the tensor `<name>` (`kt_trl.mxfp4`), FP32.
    """

    def __init__(self, files: dict[str, Path], *, fp8: bool = False, fp8_block: tuple[int, int] | None = None,
                 mxfp4: bool = False):
        self.files, self.fp8, self.fp8_block = dict(files), fp8, fp8_block
        self.mxfp4 = {key[:-len(mxfp4_format.BLOCKS)] for key in files
                      if mxfp4 and key.endswith(mxfp4_format.BLOCKS)
                      and key[:-len(mxfp4_format.BLOCKS)] + mxfp4_format.SCALES in files}
        for key in self.mxfp4:
            self.files[key] = files[key + mxfp4_format.BLOCKS]
        self._headers: dict[Path, dict[str, _Entry]] = {}
        self._fds: dict[Path, int] = {}
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()  # the loader reads several layers at once

    def entry(self, key: str) -> _Entry:
        if key in self.mxfp4:   # the parameter's shape: [E, G * 32, R] of blocks [E, R, G, 16]
            *prefix, rows, groups, _ = self.entry(key + mxfp4_format.BLOCKS).shape
            return _Entry("MXFP4", (*prefix, groups * 32, rows), 0, 0)
        path = self.files[key]
        if path not in self._headers:
            self._headers[path] = _read_header(path)  # two threads may both read it: the same result
        if key not in self._headers[path]:
            raise ValueError(f"{path.name} has no tensor {key}, which the index places there: the shard or "
                             "model.safetensors.index.json is corrupt; fetch the checkpoint again.")
        return self._headers[path][key]

    def is_scale(self, key: str) -> bool:
        """An FP8 scale or an MXFP4 part, consumed with its weight."""
        if self.mxfp4 and key.endswith((mxfp4_format.BLOCKS, mxfp4_format.SCALES)):
            return key.rsplit("_", 1)[0] in self.mxfp4
        return self.fp8 and key.endswith(("_scale_inv", ".activation_scale"))

    def quantized(self, key: str) -> bool:
        return self.fp8 and f"{key}_scale_inv" in self.files

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> None:
        """The bytes of `key` (of its `[index]`) straight into `out`, contiguous and of its dtype and size."""
        entry, path = self.entry(key), self.files[key]
        start, size = entry.start, entry.end - entry.start
        if index is not None:
            size //= entry.shape[0]
            start += index * size
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        if DTYPES.get(entry.dtype) != out.dtype or view.nbytes != size:
            raise ValueError(f"{key}: {entry.dtype} {list(entry.shape)} does not fit {out.dtype} {list(out.shape)}.")
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
        done = 0
        while done < size:
            count = os.preadv(fd, [view[done:]], start + done)
            if count <= 0:
                raise OSError(f"{path}: the file ends inside {key}; the shard is truncated, fetch it again.")
            done += count

    def read(self, key: str, index: int | None = None, *, dequantize: bool = True) -> torch.Tensor:
        """A new tensor of `key` (its `[index]` when given), an FP8 one dequantized to FP32 (with
        `dequantize`; else its codes as stored); an MXFP4 one dequantized to FP32 either way."""
        if key in self.mxfp4:
            return mxfp4_format.dequantize(self.read(key + mxfp4_format.BLOCKS, index),
                                           self.read(key + mxfp4_format.SCALES, index))
        entry = self.entry(key)
        if entry.dtype not in DTYPES or (entry.dtype == "U8" and not self.is_scale(key)):   # U8: MXFP4 parts only
            raise ValueError(f"{key} is stored as {entry.dtype}; kt_trl reads floating-point expert weights only.")
        out = torch.empty(entry.shape if index is None else entry.shape[1:], dtype=DTYPES[entry.dtype])
        self.read_into(key, out, index)
        if dequantize and self.quantized(key):
            out = dequantize_fp8(out, self.read(f"{key}_scale_inv", index), self.fp8_block)
        return out

    def lazy(self, key: str):
        """What `from_pretrained`'s state dict holds for `key`; transformers reads it with `value[...]`."""
        if self.quantized(key):
            return _Dequantized(self, key)
        path = self.files[key]
        if path not in self._handles:
            from safetensors import safe_open

            self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[path].get_slice(key)

    def check_dtypes(self) -> None:
        """Refuse FP8 tensors without a scale, or in a checkpoint whose config does not say FP8."""
        for key in self.files:
            if self.entry(key).dtype.startswith("F8") and not self.quantized(key):
                raise ValueError(
                    f"{key} is stored in FP8 but has no {key}_scale_inv beside it"
                    + ("" if self.fp8 else " and config.json has no quantization_config")
                    + ": load_model reads FP8 in DeepSeek's layout (weight + weight_scale_inv, quantization_config "
                    "{'quant_method': 'fp8', 'weight_block_size': [128, 128]}) only."
                )

    def float_dtype(self) -> torch.dtype | None:
        """The first floating dtype among the stored tensors (FP8 ones do not count)."""
        return next((DTYPES[d] for key in self.files if (d := self.entry(key).dtype) in _FLOATS), None)

    def release(self, path: Path) -> None:
        """Close `path` and drop its pages from the page cache (all but those tensors still map)."""
        self._handles.pop(path, None)
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def release_all(self) -> None:
        for path in set(self.files.values()):
            self.release(path)


class _Dequantized:
    """An FP8 weight in `from_pretrained`'s state dict, read and dequantized when transformers indexes it."""

    def __init__(self, shards: Shards, key: str):
        self.shards, self.key = shards, key

    def __getitem__(self, index):
        return self.shards.read(self.key)[index]


def fp8_block_size(quantization) -> tuple[int, int] | None:
    """`weight_block_size` of an FP8 `quantization_config` (None: one scale per tensor); refuses other methods."""
    settings = quantization if isinstance(quantization, dict) else quantization.to_dict()
    method = settings.get("quant_method")
    if method != "fp8":
        raise ValueError(
            f"This checkpoint is quantized with {method!r}; load_model reads BF16 / FP16 / FP32 checkpoints, FP8 "
            "ones in DeepSeek's block layout and gpt-oss's MXFP4. Load it with AutoModelForCausalLM.from_pretrained "
            "(dequantized to BF16 where transformers can) and pass the model to KTSFTTrainer."
        )
    block = settings.get("weight_block_size")
    return None if block is None else (int(block[0]), int(block[1]))


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """`weight [R, C]` (FP8) times its scales `scale_inv [ceil(R/b0), ceil(C/b1)]`, one per `block`
    `(b0, b1)` (DeepSeek's layout; a last block may be partial), in FP32: the product transformers'
    `Fp8Dequantize` computes before rounding to the parameter's dtype."""
    values = weight.to(torch.float32, copy=True)
    scale = scale_inv.to(torch.float32)
    if scale.numel() == 1:
        return values.mul_(scale.reshape(()))
    rows, cols = values.shape[-2:]
    b0, b1 = block if block is not None else (-(-rows // scale.shape[-2]), -(-cols // scale.shape[-1]))
    if tuple(scale.shape[-2:]) != (-(-rows // b0), -(-cols // b1)):
        raise ValueError(f"FP8 scales {list(scale.shape)} do not tile a {[rows, cols]} weight in {[b0, b1]} blocks.")
    return values.mul_(scale.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols])
