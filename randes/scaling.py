"""The retrieval scale lambda: theta_t = theta_base + lambda * T_t^-1(S).

Override order: the task's own scale > the bundle's config.scale > the data-free
default below. The default lives in ONE place (DEFAULT_SCALE / data_free_scale) so
that the quality benchmark's measured choice changes it everywhere at once.
"""

from __future__ import annotations

from randes.config import TransformConfig

DEFAULT_SCALE = 1.0
"""lambda when neither the task nor the bundle sets one. 1.0 returns a lone task exactly
(the cross-talk of other tasks is zero-mean noise, not a bias to shrink). Pending the
quality benchmark's measurement."""


def data_free_scale(n_tasks: int) -> float:
    """The default lambda for a bundle of ``n_tasks`` tasks (no data needed)."""
    if n_tasks < 0:
        raise ValueError("n_tasks must be >= 0")
    return DEFAULT_SCALE


def default_scale(n_tasks: int, config: TransformConfig, task_scale: float | None = None) -> float:
    """Resolve lambda: task scale, else bundle scale, else the data-free default."""
    if task_scale is not None:
        if not task_scale > 0:
            raise ValueError(f"scale must be > 0, got {task_scale}")
        return float(task_scale)
    if config.scale is not None:
        return float(config.scale)
    return data_free_scale(n_tasks)
