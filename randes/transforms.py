"""The seeded orthogonal maps T_t of RanDeS and the slot layout they act on.

Two maps, both fixed by the task seed alone (see randes.rng):

- column sign flips: a tensor W viewed as (shape[0], -1) becomes W * r, with
  r = sign_vector(seed, SOURCE name, columns); rank-1 tensors are flipped element-wise
  (policy "flip"). Self-inverse.
- layer shuffling: tensors whose names differ only by their first integer path
  component (``h.3.mlp.c_fc.weight``) form a group ``h.{}.mlp.c_fc.weight`` when all
  members share shape and dtype; task t's delta of member i is stored in slot
  member pi_t(i), with pi_t = permutation(seed, group key, len(group)) over the
  members sorted by layer index.

T_t = place o flip: flip keyed by the source tensor's name, then moved to its slot.
Both are permutations of coordinates times signs, so T_t is orthogonal and exactly
invertible in floating point (no rounding at all).

The layout (which base tensors are superposed, how they group) depends only on the
base's tensor metadata and the bundle's TransformConfig, so fold and retrieve always
agree on it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from randes.checkpoint import TensorMeta
from randes.config import TransformConfig
from randes.rng import inverse_permutation, permutation, sign_vector

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


def flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place column sign flip keyed by (seed, name): x viewed (shape[0], -1) times r.

    Rank-0/1 tensors are flipped element-wise. Exact in any float dtype (signs only).
    Self-inverse. Returns x.
    """
    if x.numel() == 0:
        return x
    if not x.is_contiguous():
        raise ValueError("flip_ needs a contiguous tensor")
    if x.dim() <= 1:
        r = sign_vector(seed, name, x.numel()).to(device=x.device, dtype=x.dtype)
        x.view(-1).mul_(r)
        return x
    cols = x.numel() // x.shape[0]
    r = sign_vector(seed, name, cols).to(device=x.device, dtype=x.dtype)
    x.view(x.shape[0], cols).mul_(r)
    return x


def flip(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """Out-of-place flip_: a new tensor, x untouched."""
    return flip_(seed, name, x.clone(memory_format=torch.contiguous_format))


class TaskTransform:
    """T_t for one task: which slot each source tensor goes to, and its sign flips."""

    def __init__(self, layout: Layout, seed: int) -> None:
        self.layout = layout
        self.seed = seed
        self._slot_of: dict[str, str] = {}
        self._source_of: dict[str, str] = {}
        for key, members in layout.groups.items():
            perm = permutation(seed, key, len(members))
            for i, p in enumerate(perm):
                self._slot_of[members[i]] = members[p]
            for j, i in enumerate(inverse_permutation(perm)):
                self._source_of[members[j]] = members[i]

    def slot_of(self, source: str) -> str:
        """The slot holding the (scrambled) delta of base tensor ``source``."""
        return self._slot_of.get(source, source)

    def source_of(self, slot: str) -> str:
        """The base tensor whose delta this task stores in ``slot``."""
        return self._source_of.get(slot, slot)

    def scramble_one(
        self, source: str, delta: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """The flip part of T_t for one source tensor (its placement is slot_of).

        ``inplace=True`` reuses ``delta``'s memory (streaming callers own it).
        """
        if source not in self.layout.flipped:
            return delta
        if inplace and delta.is_contiguous():
            return flip_(self.seed, source, delta)
        return flip(self.seed, source, delta)

    def unscramble_one(
        self, source: str, slot_value: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """Inverse of scramble_one: ``slot_value`` read from ``slot_of(source)``."""
        return self.scramble_one(source, slot_value, inplace=inplace)  # flips: self-inverse

    def scramble(self, deltas: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """T_t over whole superposed sets: {source: delta} -> {slot: value}."""
        return {self.slot_of(s): self.scramble_one(s, d) for s, d in deltas.items()}

    def unscramble(self, slots: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """T_t^-1: {slot: value} -> {source: delta}."""
        out: dict[str, torch.Tensor] = {}
        for slot, value in slots.items():
            source = self.source_of(slot)
            out[source] = self.unscramble_one(source, value)
        return out
