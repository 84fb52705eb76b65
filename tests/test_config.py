"""KTConfig validation."""

from __future__ import annotations

import dataclasses

import pytest

from kt_trl import KTConfig


def test_defaults():
    config = KTConfig()
    assert config.isa is None and config.threads is None and config.reuse_checkpointed_activations


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(isa="neon"), "isa='neon'.*'auto'"),
        (dict(threads=0), "threads=0"),
        (dict(threads=1.5), "threads=1.5"),
        (dict(max_pending_activations=0), "max_pending_activations"),
    ],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KTConfig(**kwargs)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KTConfig().isa = "avx2"
