"""A checkpoint's routed experts read from its safetensors files straight into CPU engines, layer by layer.

Several layers at a time (packing is CPU work on fresh memory), each layer's experts are read one by
one with `os.preadv` into two reused buffers (the next read runs while the engine packs the current
expert) into an `ExpertEngine`, handed over with `weights.install_engine`; a shard's page cache is
dropped once its last expert is read. FP8 codes go in as stored (`checkpoint_formats`); several
ranks of a host share one copy (`host_copy`). The layers `KTConfig.gpu_experts` keeps on the training
device are read expert by expert into their fused parameters there instead (`stream_to_device`), FP8
dequantized on the device: no host copy of them exists.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from .checkpoint_formats import fp8_buffers, read_fp8_codes
from .checkpoint_keys import DTYPES, LayerSources, Shards, dequantize_fp8
from .host_copy import host_engines
from .layouts import EXPERT_PARAMETERS, engine_activation, engine_bias, engine_dims, engine_expert, hf_experts
from .placement import LOADED_ON_DEVICE
from .progress import progress_bar


def stream_experts(model: nn.Module, layers: list[LayerSources], shards: Shards, layout, dtype,
                    engine_format: tuple[str, int | None]) -> int:
    """Fill the layers' engines expert by expert and install them, one copy per host when several ranks
    share it (`kt_trl.host_copy`: the others map it, reading nothing). Returns the packed bytes."""
    from ._native import ensure_configured
    from .weights import install_engine

    ensure_configured()  # here, once: the workers create engines concurrently
    modules = [model.get_submodule(layer.module) for layer in layers]
    for experts, layer in zip(modules, layers):
        _check_placeholders(experts, layer)
    format, block_k = engine_format
    sizes = [(*engine_dims(layout, experts), format, block_k) for experts in modules]

    def attach(i: int, memory):   # the experts another rank of this host streamed; the biases are this rank's
        from .engine import ExpertEngine

        biases = ([(None, None, *engine_bias(layout, modules[i], e)) for e in range(sizes[i][0])] if layout.bias
                  else None)
        return ExpertEngine.from_experts(*sizes[i][:3], biases, format=format, block_k=block_k, memory=memory,
                                         filled=True, **engine_activation(layout, modules[i]))

    engines = host_engines(sizes, lambda memories: _stream_layers(modules, layers, shards, layout, dtype,
                                                                  engine_format, memories), attach)
    for experts, engine in zip(modules, engines):
        install_engine(experts, engine, layout)
        experts.register_state_dict_post_hook(functools.partial(_unpack_installed_engine, layout))
    return sum(int(engine.packed_bytes) for engine in engines)


class _ShardReaders:
    """Which layers still read each shard: `done(layer)` drops a shard's page cache after its last one."""

    def __init__(self, shards: Shards, layers: list[LayerSources]):
        self.shards, self.count = shards, {}
        for layer in layers:
            for path in self.paths(layer):
                self.count[path] = self.count.get(path, 0) + 1

    def paths(self, layer: LayerSources) -> set:
        return {self.shards.files[key] for key in layer.keys}

    def done(self, layer: LayerSources) -> None:
        for path in self.paths(layer):
            self.count[path] -= 1
            if not self.count[path]:
                self.shards.release(path)


def stream_to_device(model: nn.Module, layers: list[LayerSources], shards: Shards, dtype: torch.dtype,
                     device: torch.device, *, later: list[LayerSources]) -> int:
    """Fill the layers' fused expert parameters on `device` expert by expert, in `dtype` (the values
    `from_pretrained` would hold: FP8 dequantized in FP32, then rounded), and mark them for
    `kt_trl.placement`. A shard's page cache is dropped once no layer here or in `later` reads it.
    Returns the bytes placed."""
    modules = [model.get_submodule(layer.module) for layer in layers]
    for experts, layer in zip(modules, layers):
        _check_placeholders(experts, layer)
    readers = _ShardReaders(shards, layers + later)
    placed = 0
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt_trl_read") as reader, \
            progress_bar(total=len(layers), desc=f"Reading experts onto {device}", unit="layer") as bar:
        for experts, layer in zip(modules, layers):
            params = {name: torch.empty(getattr(experts, name).shape, dtype=dtype, device=device)
                      for name in EXPERT_PARAMETERS}
            count = params[EXPERT_PARAMETERS[0]].shape[0]

            def read(e: int, layer=layer):   # as stored, with the scales of FP8 codes
                return [[(source, shards.read(source.key, source.index, dequantize=False),
                          shards.read(f"{source.key}_scale_inv", source.index) if shards.quantized(source.key) else None)
                         for source in sources[e]] for sources in layer.sources]

            for e, stored in enumerate(_read_ahead(reader, read, count)):
                for name, per_source in zip(EXPERT_PARAMETERS, stored):
                    for source, values, scale in per_source:
                        values = values.to(device)
                        if scale is not None:
                            values = dequantize_fp8(values, scale.to(device), shards.fp8_block)
                        params[name][e].index_copy_(0, source.rows.to(device), values.to(dtype))
            for name, tensor in params.items():
                setattr(experts, name, nn.Parameter(tensor, requires_grad=getattr(experts, name).requires_grad))
                placed += tensor.numel() * tensor.element_size()
            setattr(experts, LOADED_ON_DEVICE, True)
            readers.done(layer)
            bar.update()
    return placed


def stream_workers(layers: int) -> int:
    """How many layers `_stream_layers` reads and packs at once: one per two logical CPUs, at least two, at most 8."""
    return max(1, min(layers, 8, max(2, (os.cpu_count() or 2) // 2)))


def _stream_layers(modules, layers: list[LayerSources], shards: Shards, layout, dtype, engine_format, memories):
    """The layers' engines (into `memories` where given), several layers at once; each shard's page cache is
    dropped once every layer reading from it is done."""
    readers = _ShardReaders(shards, layers)
    engines = []
    # Packing is CPU work on fresh memory, whose page faults cost more than the packing itself on some hosts
    # (VMs): several layers at once spread both over the cores (each layer's engine is its own memory), one
    # packing thread and its reader per two logical CPUs, at least two.
    workers = stream_workers(len(layers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kt_trl_load")
    try:
        futures = [pool.submit(_layer_engine, experts, layer, shards, layout, dtype, engine_format, memory)
                   for experts, layer, memory in zip(modules, layers, memories)]
        with progress_bar(total=len(layers), desc="Streaming experts into the CPU engine", unit="layer") as bar:
            for layer, future in zip(layers, futures):
                engines.append(future.result())
                readers.done(layer)
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return engines


def _unpack_installed_engine(layout, module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    """`state_dict()` of a loaded model not prepared yet: the installed engine's experts, not the placeholders.

    install_engine leaves the placeholders in `state_dict()` until `prepare_model` attaches its hooks (and takes
    the engine: this one then does nothing). Remove it once install_engine attaches them itself.
    """
    engine = getattr(module, "_kt_engine", None)
    if engine is None or prefix.startswith("base_model.model."):  # prepared, or a PEFT state dict (adapters only)
        return
    for name, tensor in zip(EXPERT_PARAMETERS, hf_experts(layout, *engine.unpack())):
        state_dict[prefix + name] = tensor.to(state_dict[prefix + name].dtype)


def _check_placeholders(experts: nn.Module, layer: LayerSources) -> None:
    for param in EXPERT_PARAMETERS:
        if any(getattr(experts, param).stride()):
            raise RuntimeError(
                f"{layer.module}.{param}: transformers allocated the expert placeholder instead of installing it "
                "(a change in from_pretrained); kt_trl.load_model would hold the experts twice. Please report this."
            )


def _layer_engine(experts: nn.Module, layer: LayerSources, shards: Shards, layout, dtype,
                  engine_format: tuple[str, int | None], memory=None):
    """The layer's engine, filled expert by expert from two reused buffers (one read, one packed): FP8
    codes as stored, or weights in `dtype` (quantized by the engine for an 8-bit format). Biases (gpt-oss)
    come from the module, which transformers loaded with the other weights."""
    from .engine import ExpertEngine

    E, H, I = engine_dims(layout, experts)
    format, block_k = engine_format
    if format == "fp8" and block_k is not None:
        ring = [(fp8_buffers((2 * I, H), block_k), fp8_buffers((H, I), block_k)) for _ in range(2)]

        def read(e: int):
            for sources, out in zip(layer.sources, ring[e % 2]):
                read_fp8_codes(shards, sources[e], out)
            return ring[e % 2]
    else:
        first = [shards.entry(per_param[0][0].key).dtype for per_param in layer.sources]
        ring = [tuple(torch.empty(getattr(experts, param).shape[1:], dtype=_buffer_dtype(disk, dtype, shards.fp8))
                      for param, disk in zip(EXPERT_PARAMETERS, first)) for _ in range(2)]

        def read(e: int):
            buffers = ring[e % 2]
            for sources, out in zip(layer.sources, buffers):
                _read_matrix(shards, sources[e], out, dtype)
            weights = engine_expert(layout, *buffers)
            return weights + engine_bias(layout, experts, e) if layout.bias else weights

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt_trl_read") as reader:
        return ExpertEngine.from_experts(E, H, I, _read_ahead(reader, read, E), format=format, block_k=block_k,
                                         memory=memory, **engine_activation(layout, experts))


def _read_ahead(pool: ThreadPoolExecutor, read, count: int):
    """`read(0), read(1), ...`, each next one running on `pool` while the caller packs the current one
    (so `read(e + 1)` may reuse what `read(e - 1)` returned)."""
    future = pool.submit(read, 0)
    for e in range(count):
        result = future.result()
        if e + 1 < count:
            future = pool.submit(read, e + 1)
        yield result


def _buffer_dtype(disk: str, dtype: torch.dtype, fp8: bool) -> torch.dtype:
    # from_pretrained would hold the experts in `dtype`, and the engine rounds that to BF16. BF16 -> FP32 -> BF16
    # is exact, so BF16 on disk stays BF16 (read with no conversion); any other case rounds as from_pretrained does.
    if not fp8 and DTYPES.get(disk) == torch.bfloat16 and dtype in (torch.bfloat16, torch.float32):
        return torch.bfloat16
    return dtype


def _read_matrix(shards: Shards, sources, out: torch.Tensor, dtype: torch.dtype) -> None:
    """One expert's `[A, B]` slice of a fused parameter into `out`, from its checkpoint tensors."""
    for source in sources:
        first = int(source.rows[0])
        consecutive = torch.equal(source.rows, torch.arange(first, first + source.rows.numel()))
        if consecutive and DTYPES.get(shards.entry(source.key).dtype) == out.dtype and not shards.quantized(source.key):
            shards.read_into(source.key, out[first:first + source.rows.numel()], source.index)  # no copy
        else:
            out.index_copy_(0, source.rows, shards.read(source.key, source.index).to(dtype).to(out.dtype))
