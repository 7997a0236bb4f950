"""Where each base tensor goes in a bundle: the slot layout, and the checks against it.

The layout (which base tensors are superposed, which stay private per task, which are
non-float buffers, how layers group for shuffling) depends only on the base's tensor
headers and the bundle's TransformConfig, so fold, retrieval, scaling and capacity
(and storage, planning a pull or a group) always agree on it without reading data.
The maps that act on the slots are randes.transforms'.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from randes.config import TransformConfig
from randes.errors import IncompatibleCheckpointError
from randes.source import TensorMeta, TensorSource, metas_of

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


_INDEX = re.compile(r"^\d+$")


def layer_group_key(name: str) -> tuple[str, int] | None:
    """(``h.{}.mlp.c_fc.weight``, 3) for ``h.3.mlp.c_fc.weight``; None without an index."""
    parts = name.split(".")
    for pos, part in enumerate(parts):
        if _INDEX.match(part):
            key = ".".join([*parts[:pos], "{}", *parts[pos + 1 :]])
            return key, int(part)
    return None


def is_rank1(meta: TensorMeta) -> bool:
    """Biases, norms and scalars: the tensors the rank-1 policy decides about."""
    return len(meta.shape) <= 1


@dataclass(frozen=True)
class Layout:
    """Where each base tensor goes in a bundle, derived from base metadata + config."""

    config: TransformConfig
    superposed: tuple[str, ...]
    """Float base tensors held in the superposition; also the slot names (sorted)."""
    private_base: frozenset[str]
    """Float rank-1 base tensors kept per task (rank1 policy "private")."""
    non_float: frozenset[str]
    """Integer / bool base tensors (buffers): never superposed."""
    flipped: frozenset[str]
    """Superposed tensors whose deltas get sign flips."""
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Layer-shuffle groups: key -> members sorted by layer index (2 or more each)."""
    group_of: Mapping[str, str] = field(default_factory=dict)


def plan_layout(metas: Mapping[str, TensorMeta], config: TransformConfig) -> Layout:
    """Decide, for a base model and a bundle config, the superposition's layout."""
    superposed: list[str] = []
    private_base: set[str] = set()
    non_float: set[str] = set()
    mapped: list[str] = []  # tensors both maps may act on
    for name in sorted(metas):
        meta = metas[name]
        if not meta.is_float:
            non_float.add(name)
        elif is_rank1(meta) and config.rank1 == "private":
            private_base.add(name)
        else:
            superposed.append(name)
            if not (is_rank1(meta) and config.rank1 == "plain"):
                mapped.append(name)

    flipped = frozenset(mapped) if config.sign_flip else frozenset()
    groups: dict[str, tuple[str, ...]] = {}
    group_of: dict[str, str] = {}
    if config.layer_shuffle:
        candidates: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for name in mapped:
            found = layer_group_key(name)
            if found is not None:
                candidates[found[0]].append((found[1], name))
        for key, members in candidates.items():
            shapes = {(metas[n].shape, metas[n].dtype) for _, n in members}
            indices = [i for i, _ in members]
            if len(members) < 2 or len(shapes) != 1 or len(set(indices)) != len(indices):
                continue
            ordered = tuple(n for _, n in sorted(members))
            groups[key] = ordered
            for n in ordered:
                group_of[n] = key
    return Layout(
        config=config,
        superposed=tuple(superposed),
        private_base=frozenset(private_base),
        non_float=frozenset(non_float),
        flipped=flipped,
        groups=groups,
        group_of=group_of,
    )


def superposition_dtype(config: TransformConfig) -> torch.dtype:
    return TORCH_DTYPES[config.dtype]


def layout_of(base: TensorSource, config: TransformConfig) -> Layout:
    return plan_layout(metas_of(base), config)


def superposed_names(base: TensorSource, config: TransformConfig) -> list[str]:
    """The slot names a superposition over ``base`` holds (sorted)."""
    return list(layout_of(base, config).superposed)


def superposition_metas(base: TensorSource, config: TransformConfig) -> dict[str, TensorMeta]:
    """Each slot's header in a superposition over ``base``: the base's shape, the bundle
    dtype. What a serving copy is read back as (randes.serving.QuantizedReader)."""
    dtype = superposition_dtype(config)
    return {
        slot: TensorMeta(dtype=dtype, shape=base.meta(slot).shape)
        for slot in layout_of(base, config).superposed
    }


def check_superposition(base: TensorSource, superposition: TensorSource, layout: Layout) -> None:
    """A stored superposition has exactly the layout's slots, base-shaped, in the bundle dtype."""
    dtype = superposition_dtype(layout.config)
    expected = set(layout.superposed)
    actual = set(superposition.keys())
    if actual != expected:
        diff = sorted(expected ^ actual)
        raise IncompatibleCheckpointError(
            f"superposition does not match the base layout ({len(diff)} names differ, "
            f"e.g. {diff[0]!r})"
        )
    for slot in layout.superposed:
        meta = superposition.meta(slot)
        if meta.shape != base.meta(slot).shape or meta.dtype != dtype:
            raise IncompatibleCheckpointError(
                f"superposition slot {slot!r}: {meta.dtype}{list(meta.shape)} does not match "
                f"{dtype}{list(base.meta(slot).shape)}"
            )
