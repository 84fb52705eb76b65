"""Moving one expert call's tensors between a CUDA device and the CPU engine.

[NOTE] Data flow of one MoE layer whose hidden states live on a CUDA device:

    forward   x [T, H] (cast to BF16 on the GPU), top_k_index [T, k], top_k_weights [T, k]
              --non-blocking D2H--> pinned host tensors; one CUDA event recorded on the current
              stream after the copies; the host waits on that event only (no torch.cuda.synchronize())
              engine --> y [T, H] written straight into a pinned buffer (`empty_for`)
              --non-blocking H2D--> GPU
    backward  dY [T, H] down the same way; dX [T, H] and dL/dw [T, k] up the same way.

The host tensors `to_host` returns are caller-owned (the forward's `x`, ids and weights are saved
for backward). A non-blocking H2D copy still reads its pinned source after `copy_` returns, so
`to_device` keeps each source, with an event recorded after its copy, until that event has
completed (`InFlightCopies`, checked on every call and bounded). The H2D copies run on the current
stream, so whatever the GPU does next with the result is ordered after them. On the CPU nothing of
this happens: tensors pass through as before and no pinned memory is requested.

Why kt_trl leaves torch's and the engine's thread counts alone: README, "CPU threads".
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class StagingStats:
    """Counters of a `HostStaging` (seconds are summed over calls).

    Attributes:
        to_host_calls / to_device_calls: Calls that moved at least one tensor across PCIe.
        to_host_bytes / to_device_bytes: Bytes moved.
        wait_seconds: Host time blocked on the D2H events: the GPU work queued before the copies,
            then the copies themselves.
        pin_copy_seconds: Host time copying engine outputs into pinned buffers.
        d2h_gpu_seconds / h2d_gpu_seconds: Device time of the copies (CUDA timing events); H2D
            copies count once they are released.
    """

    to_host_calls: int = 0
    to_host_bytes: int = 0
    to_device_calls: int = 0
    to_device_bytes: int = 0
    wait_seconds: float = 0.0
    pin_copy_seconds: float = 0.0
    d2h_gpu_seconds: float = 0.0
    h2d_gpu_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class _Copy:
    done: Any  # event recorded after the copy (query(), synchronize(), elapsed_time())
    start: Any  # event recorded before it
    source: torch.Tensor


class InFlightCopies:
    """Pinned sources of non-blocking copies, each kept until the event after its copy completes.

    Events need `query()`, `synchronize()` and `elapsed_time(other)` (milliseconds), as
    `torch.cuda.Event(enable_timing=True)` has. Thread-safe (forward and backward run on different
    threads).

    Args:
        max_in_flight (`int`, *optional*, defaults to `64`): Beyond this many, `add` waits on the
            oldest copy's event (that event only) before keeping another source.
    """

    def __init__(self, *, max_in_flight: int = 64) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._copies: collections.deque[_Copy] = collections.deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._copies)

    def add(self, done, start, source: torch.Tensor) -> float:
        """Keep `source` until `done` completes; returns the device seconds of the copies released meanwhile."""
        with self._lock:
            self._copies.append(_Copy(done, start, source))
            seconds = 0.0
            while len(self._copies) > self.max_in_flight:
                oldest = self._copies.popleft()
                oldest.done.synchronize()
                seconds += _seconds(oldest)
            return seconds + self._release_finished_locked()

    def release_finished(self) -> float:
        """Drop the sources whose copies have completed, oldest first; returns their device seconds."""
        with self._lock:
            return self._release_finished_locked()

    def _release_finished_locked(self) -> float:
        seconds = 0.0
        while self._copies and self._copies[0].done.query():
            seconds += _seconds(self._copies.popleft())
        return seconds


def _seconds(copy: _Copy) -> float:
    return copy.start.elapsed_time(copy.done) / 1e3


class HostStaging:
    """Moves expert-call tensors between a CUDA device and the CPU through pinned buffers.

    One instance serves all routed layers of a model (`prepare_model` creates it). CPU tensors
    pass through untouched; see the module docstring for the CUDA path.

    Args:
        max_in_flight (`int`, *optional*, defaults to `64`): How many H2D copies may be in flight
            before `to_device` waits on the oldest one's event.

    Example:

    ```python
    >>> staging = HostStaging()
    >>> x, top_k_index = torch.randn(4, 8), torch.randint(0, 8, (4, 2))        # on cuda:0 in training
    >>> x_cpu, ids_cpu = staging.to_host(x.to(torch.bfloat16), top_k_index)  # from cuda:0: pinned copies
    >>> y = staging.to_device(x_cpu, device=x.device, dtype=x.dtype)          # to cuda:0: on the current stream
    ```
    """

    def __init__(self, *, max_in_flight: int = 64) -> None:
        self.stats = StagingStats()
        self.in_flight = InFlightCopies(max_in_flight=max_in_flight)

    def to_host(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Contiguous CPU versions of `tensors` (same dtypes); caller-owned.

        CUDA tensors are copied into new pinned tensors with non-blocking copies on the current
        stream; the host then waits on one event recorded after the copies.
        """
        tensors = tuple(t.contiguous() for t in tensors)
        on_device = [t for t in tensors if t.is_cuda]
        if not on_device:
            return tensors
        stream = torch.cuda.current_stream(on_device[0].device)
        start, done = _timing_event(), _timing_event()
        start.record(stream)
        out = []
        for t in tensors:
            if t.is_cuda:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t = host
            out.append(t)
        done.record(stream)
        begin = time.perf_counter()
        done.synchronize()
        stats = self.stats
        stats.wait_seconds += time.perf_counter() - begin
        stats.d2h_gpu_seconds += start.elapsed_time(done) / 1e3
        stats.to_host_calls += 1
        stats.to_host_bytes += sum(t.numel() * t.element_size() for t in on_device)
        self.release_finished()  # the H2D copies queued before this event are done too
        return tuple(out)

    def empty_for(self, device: torch.device | str):
        """An `empty(shape, dtype)` for engine outputs bound for `device`: pinned host tensors for
        CUDA (`to_device` then copies them without a host memcpy), else None (the engine's default)."""
        if torch.device(device).type != "cuda":
            return None
        return lambda shape, dtype: torch.empty(shape, dtype=dtype, pin_memory=True)

    def to_device(self, tensor: torch.Tensor, *, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """`tensor` (CPU) as `dtype` on `device`.

        For CUDA: copied into a pinned buffer unless it is pinned already, then a non-blocking H2D
        copy on the current stream (the cast, if any, follows on the device); the pinned source is
        kept until the copy is done.
        """
        device = torch.device(device)
        if device.type != "cuda":
            return tensor.to(device=device, dtype=dtype)
        pinned = tensor
        if not tensor.is_pinned():
            begin = time.perf_counter()
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor)
            self.stats.pin_copy_seconds += time.perf_counter() - begin
        stream = torch.cuda.current_stream(device)
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        start, done = _timing_event(), _timing_event()
        start.record(stream)
        out.copy_(pinned, non_blocking=True)
        done.record(stream)
        self.stats.h2d_gpu_seconds += self.in_flight.add(done, start, pinned)
        self.stats.to_device_calls += 1
        self.stats.to_device_bytes += pinned.numel() * pinned.element_size()
        return out.to(dtype)

    def release_finished(self) -> None:
        """Drop the pinned sources of completed H2D copies (also done on every `to_device`)."""
        self.stats.h2d_gpu_seconds += self.in_flight.release_finished()


def _timing_event():
    return torch.cuda.Event(enable_timing=True)
