"""Real handwritten digits (scikit-learn's bundled 1797 8x8 images) and the task suite.

Every task is defined by (a) an input transform applied to the image and (b) a label
function of the digit. Transforms make the tasks *genuinely different* for the backbone
(a rotated or inverted digit needs other features than an upright one), while label
re-mappings (parity, >= 5, mod 3) change only what the head must read out. That is the
mix real multi-task suites have, and it is what makes delta interference measurable.

The split is fixed by a seed and stratified by digit, so every process, test and
benchmark sees the same train / val / test images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

SPLIT_SEED = 0
"""Seed of the stratified train/val/test split; changing it changes every number reported."""

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Task:
    """One fine-tuning task: what is done to the image, what label is asked, how many classes."""

    name: str
    description: str
    num_classes: int
    transform: Callable[[Tensor], Tensor]
    label: Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _rot90(x: Tensor) -> Tensor:
    return torch.rot90(x, k=1, dims=(-2, -1))


def _invert(x: Tensor) -> Tensor:
    return 1.0 - x


def _hflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-1,))


def _vflip(x: Tensor) -> Tensor:
    return torch.flip(x, dims=(-2,))


def _transpose(x: Tensor) -> Tensor:
    return x.transpose(-2, -1)


def _shift(x: Tensor) -> Tensor:
    """Roll by 2 pixels right and down: the digit wraps around the border (8x8 is tight)."""
    return torch.roll(x, shifts=(2, 2), dims=(-2, -1))


def _noise(x: Tensor) -> Tensor:
    """Fixed salt noise: a deterministic per-image pattern, so the test set never changes."""
    g = torch.Generator().manual_seed(1234)
    mask = torch.rand(x.shape, generator=g) < 0.15
    return torch.where(mask, 1.0 - x, x)


def _digit(y: Tensor) -> Tensor:
    return y


def _parity(y: Tensor) -> Tensor:
    return y % 2


def _ge5(y: Tensor) -> Tensor:
    return (y >= 5).long()


def _mod3(y: Tensor) -> Tensor:
    return y % 3


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("digit", "digit class of the upright image", 10, _identity, _digit),
        Task("parity", "even / odd digit", 2, _identity, _parity),
        Task("rot90", "digit of the image rotated by 90 degrees", 10, _rot90, _digit),
        Task("invert", "digit of the intensity-inverted image", 10, _invert, _digit),
        Task("hflip", "digit of the horizontally mirrored image", 10, _hflip, _digit),
        Task("ge5", "is the digit of the upside-down image >= 5", 2, _vflip, _ge5),
        Task("mod3", "digit of the transposed image, modulo 3", 3, _transpose, _mod3),
        Task("shift", "digit of the image rolled 2 px right and down", 10, _shift, _digit),
    )
}
"""The 8 benchmark tasks, in the order they are folded."""


def _rot180(x: Tensor) -> Tensor:
    return torch.rot90(x, k=2, dims=(-2, -1))


def _rot270(x: Tensor) -> Tensor:
    return torch.rot90(x, k=3, dims=(-2, -1))


def _blur(x: Tensor) -> Tensor:
    """3x3 box blur (zero padded): strokes thicken and fade, fine detail goes."""
    k = torch.full((1, 1, 3, 3), 1.0 / 9.0)
    return torch.nn.functional.conv2d(x.unsqueeze(1), k, padding=1).squeeze(1) * 2.0


_LOOPS = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])


def _loops(y: Tensor) -> Tensor:
    """Closed loops of the digit's usual glyph: 0, 4, 6, 9 have one, 8 has two."""
    return _LOOPS[y]


EXTRA_TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("noise", "digit under 15% salt noise", 10, _noise, _digit),
        Task("rot180", "digit of the image rotated by 180 degrees", 10, _rot180, _digit),
        Task("rot270", "digit of the image rotated by 270 degrees", 10, _rot270, _digit),
        Task("blur", "digit of the 3x3-blurred image", 10, _blur, _digit),
        Task("loops", "closed loops of the upright digit (0, 1 or 2)", 3, _identity, _loops),
    )
}
"""Tasks beyond the 8-task suite: `benchmarks.quality --tasks N` folds them after it to
see how the best lambda moves past 8 tasks."""


ALL_TASKS: dict[str, Task] = {**TASKS, **EXTRA_TASKS}
"""Suite then extras, in fold order."""


def get_task(name: str) -> Task:
    """Look a task up by name in the benchmark suite or the extras, with one clear error."""
    if name in TASKS:
        return TASKS[name]
    if name in EXTRA_TASKS:
        return EXTRA_TASKS[name]
    known = ", ".join([*TASKS, *EXTRA_TASKS])
    raise KeyError(f"unknown digits task {name!r}; known: {known}")


@lru_cache(maxsize=1)
def _raw() -> tuple[Tensor, Tensor, dict[str, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    digits = torch.tensor(data.target, dtype=torch.long)
    idx = np.arange(len(digits))
    train, rest = train_test_split(
        idx, test_size=0.4, random_state=SPLIT_SEED, stratify=data.target
    )
    val, test = train_test_split(
        rest, test_size=0.5, random_state=SPLIT_SEED, stratify=data.target[rest]
    )
    return images, digits, {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_split(split: str) -> tuple[Tensor, Tensor]:
    """Raw upright images (N, 8, 8) in [0, 1] and digit labels of one split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, digits, index = _raw()
    sel = torch.from_numpy(index[split])
    return images[sel], digits[sel]


@lru_cache(maxsize=64)
def task_split(task: str, split: str) -> tuple[Tensor, Tensor]:
    """Transformed images and task labels of one split (cached: evaluation runs often)."""
    t = get_task(task)
    images, digits = digits_split(split)
    return t.transform(images).contiguous(), t.label(digits)
