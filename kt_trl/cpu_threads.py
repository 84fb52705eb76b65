"""Torch's intra-op threads while a model trains on the CPU beside the engine.

[NOTE] On a CPU-only run torch's intra-op pool and the engine's workers take turns on the same
cores. Torch runs many small parallel regions per step, each ending at a barrier that waits for its
slowest thread, so one core busy with anything else stalls every region: on a 2-core machine with
one core busy, the demo trained at 104 tokens/s with torch's default 2 threads and 1195 with 1
(with both cores busy 23 against 333; on an idle machine the two are within 2 %). The engine's own
pool does not collapse the same way (322 against 345 tokens/s with 1 or 2 workers under load): its
calls are few and large. So while a model trains on the CPU, torch runs single-threaded unless the
user chose otherwise (`KTConfig(torch_threads=...)` or `OMP_NUM_THREADS`); on an accelerator torch's
threads are left alone (they run the CPU optimizer step over the expert LoRA between engine calls).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)


def training_threads(device, requested: int | None) -> int | None:
    """Torch intra-op threads for training on `device`; None leaves torch's setting alone."""
    if requested is not None:
        return requested
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    return 1


@contextlib.contextmanager
def torch_threads(device, requested: int | None):
    """Run the block with `training_threads(device, requested)` torch threads, restored afterwards."""
    threads, before = training_threads(device, requested), torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    logger.info("kt_trl: torch runs %d intra-op thread(s) while training on %s (KTConfig.torch_threads).", threads, device)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
