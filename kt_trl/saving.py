"""Checkpoints that appear only when complete.

Trainer writes `checkpoint-N` in place, file by file (adapter, optimizer, scheduler, RNG, state);
killed halfway, it leaves a directory that `resume_from_checkpoint=True` picks as the newest and
then fails on. Here the same save goes into a hidden staging directory beside it
(`.incomplete-checkpoint-N/checkpoint-N`, which neither Trainer's checkpoint search nor its
rotation matches) and is renamed into place when everything is written, so the newest
`checkpoint-N` is always a complete one. A staging directory left by a crash is removed by the
next save of that step.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = ".incomplete-"


def save_checkpoint_atomically(trainer, save: Callable[[], None], *, run_dir: str) -> None:
    """Run `save()` (Trainer's `_save_checkpoint`) with `trainer._kt_staging_dir` as its output
    directory, then move the finished `checkpoint-N` into `run_dir` in one rename."""
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer._kt_staging_dir = staging
    try:
        save()
    finally:
        trainer._kt_staging_dir = None
    trainer.accelerator.wait_for_everyone()  # every rank has written its part
    if not trainer.args.should_save:
        return
    replaced = os.path.join(staging, "replaced")
    if os.path.exists(final):  # the same step saved again: the old copy goes only after the new is in
        os.replace(final, replaced)
    os.replace(os.path.join(staging, name), final)
    _sync_directory(run_dir)
    shutil.rmtree(staging)
    best = trainer.state.best_model_checkpoint
    if best is not None and best.startswith(staging):
        trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
    rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


def _sync_directory(path: str) -> None:
    """Make the rename durable (POSIX: fsync the directory holding it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
