"""lambda resolution: task > bundle > data-free default."""

from __future__ import annotations

import pytest

from randes.config import TransformConfig
from randes.scaling import DEFAULT_SCALE, data_free_scale, default_scale


def test_override_order() -> None:
    assert default_scale(3, TransformConfig()) == data_free_scale(3) == DEFAULT_SCALE
    assert default_scale(3, TransformConfig(scale=0.7)) == 0.7
    assert default_scale(3, TransformConfig(scale=0.7), task_scale=0.4) == 0.4
    assert default_scale(3, TransformConfig(), task_scale=1.3) == 1.3


def test_invalid() -> None:
    with pytest.raises(ValueError):
        default_scale(1, TransformConfig(), task_scale=0.0)
    with pytest.raises(ValueError):
        data_free_scale(-1)
