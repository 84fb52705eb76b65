"""KTConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

from kt_trl import KTConfig


def test_defaults():
    config = KTConfig()
    assert config.isa is None and config.threads is None and config.reuse_checkpointed_activations
    assert config.max_kept_activations_gb is None and config.kept_activations_limit_bytes is None
    assert KTConfig(max_kept_activations_gb=2.5).kept_activations_limit_bytes == 2_500_000_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(isa="neon"), "isa='neon'.*'auto'"),
        (dict(threads=0), "threads=0"),
        (dict(threads=1.5), "threads=1.5"),
        (dict(max_pending_activations=0), "max_pending_activations"),
        (dict(max_kept_activations_gb=-1.0), "max_kept_activations_gb=-1.0"),
        (dict(max_kept_activations_gb=float("nan")), "max_kept_activations_gb=nan"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KTConfig(**kwargs)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KTConfig().isa = "avx2"
