"""Progress bars of kt_trl's long loops (packing experts, exporting adapters)."""

from __future__ import annotations


def progress_bar(*, total: int, **kwargs):
    """A tqdm bar (notebook-aware) unless there are fewer than two steps or transformers' progress
    bars are off (`transformers.utils.logging.disable_progress_bar()`)."""
    from tqdm.auto import tqdm
    from transformers.utils.logging import is_progress_bar_enabled

    return tqdm(total=total, disable=total < 2 or not is_progress_bar_enabled(), **kwargs)


def with_progress(items: list, **kwargs):
    """Iterate `items` under a `progress_bar` of their count."""
    with progress_bar(total=len(items), **kwargs) as bar:
        for item in items:
            yield item
            bar.update()
