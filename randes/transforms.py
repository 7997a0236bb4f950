"""The seeded orthogonal maps T_t of RanDeS and the slot layout they act on.

Every map is fixed by the task seed alone (see randes.rng). The sign part is chosen per
bundle (TransformConfig.map); a tensor W is viewed as (shape[0], -1):

- ``columns``: W -> W D_c, D_c = diag(sign_vector(seed, SOURCE name, columns)) (the
  paper's column sign flips);
- ``two-sided``: W -> D_r W D_c, the same D_c and D_r = diag(row_sign_vector(...)): a
  sign per row and per column, still acting on a layer's inputs and outputs only;
- ``elementwise``: an independent sign per entry, drawn chunk by chunk
  (rng.element_signs, ELEMENT_CHUNK entries at a time, bit-packed in the stream and
  never stored);

rank-0/1 tensors are flipped element-wise by each (policy rank1="flip"): with
sign_vector under ``columns`` and ``two-sided`` (as before the map setting existed), with
the elementwise stream under ``elementwise``.
Then layer shuffling: tensors whose names differ only by their first integer path
component (``h.3.mlp.c_fc.weight``) form a group ``h.{}.mlp.c_fc.weight`` when all
members share shape and dtype; task t's delta of member i is stored in slot member
pi_t(i), with pi_t = permutation(seed, group key, len(group)) over the members sorted by
layer index.

T_t = place o signs: signs keyed by the source tensor's name, then moved to its slot.
Both are permutations of coordinates times signs, so T_t is orthogonal and exactly
invertible in floating point (no rounding at all); every sign map is its own inverse.

Why more than column flips: fine-tune deltas are close to low rank, with dominant
directions often shared between tasks. Column flips keep a delta's row structure, so
task t hears the others' cross-talk in the very output directions its own delta uses;
scrambling both sides (or every entry) makes the cross-talk incoherent noise
(docs/benchmarks.md, "Quality by map").

The layout these maps act on (which base tensors are superposed, how they group) is
randes.layout's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from randes.config import MapName
from randes.layout import Layout
from randes.rng import (
    ELEMENT_CHUNK,
    SIGN_TABLE,
    element_sign_bytes,
    inverse_permutation,
    permutation,
    row_sign_vector,
    sign_vector,
)


def _check(x: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError("sign maps need a contiguous tensor")


def flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place column sign flip keyed by (seed, name): x viewed (shape[0], -1) times r.

    Rank-0/1 tensors are flipped element-wise. Exact in any float dtype (signs only).
    Self-inverse. Returns x.
    """
    if x.numel() == 0:
        return x
    _check(x)
    if x.dim() <= 1:
        r = sign_vector(seed, name, x.numel()).to(device=x.device, dtype=x.dtype)
        x.view(-1).mul_(r)
        return x
    cols = x.numel() // x.shape[0]
    r = sign_vector(seed, name, cols).to(device=x.device, dtype=x.dtype)
    x.view(x.shape[0], cols).mul_(r)
    return x


def two_sided_flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place D_r x D_c keyed by (seed, name), x viewed (shape[0], -1).

    D_c is flip_'s column signs, D_r independent row signs. Rank-0/1 tensors are flipped
    element-wise exactly as flip_ does. Self-inverse. Returns x.
    """
    if x.numel() == 0 or x.dim() <= 1:
        return flip_(seed, name, x)
    _check(x)
    rows, cols = x.shape[0], x.numel() // x.shape[0]
    flip_(seed, name, x)
    r = row_sign_vector(seed, name, rows).to(device=x.device, dtype=x.dtype)
    x.view(rows, cols).mul_(r.unsqueeze(1))
    return x


_UNPACK = 4096
"""Packed bytes unpacked per piece: 4096 bytes = 32768 signs, torch's parallel grain."""


def element_flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place independent sign per entry keyed by (seed, name), any rank.

    Entry i of the flattened tensor gets sign i of the elementwise stream; the signs are
    drawn one chunk (ELEMENT_CHUNK entries, 4 MiB as float32) at a time and dropped, so
    the extra memory is one chunk whatever the tensor's size. Self-inverse. Returns x.
    """
    if x.numel() == 0:
        return x
    _check(x)
    flat = x.view(-1)
    size = min(ELEMENT_CHUNK, flat.numel())
    # Two buffers reused for every chunk (no allocation per chunk): the packed bytes as
    # int32 indices, and the unpacked signs (element_signs, written in place).
    index = torch.empty((size + 7) // 8, dtype=torch.int32)
    signs = torch.empty(index.numel(), 8, dtype=torch.float32)
    for chunk, start in enumerate(range(0, flat.numel(), ELEMENT_CHUNK)):
        part = flat[start : start + ELEMENT_CHUNK]
        n = part.numel()
        octets = torch.frombuffer(
            bytearray(element_sign_bytes(seed, name, chunk, n)), dtype=torch.uint8
        )
        # Unpacked in pieces below torch's parallel grain (32768 elements), so they run on
        # the calling thread: on a busy machine each parallel op can wait for a descheduled
        # OpenMP thread, and this leaves one parallel op per chunk (the mul_), as few as
        # the column map runs per tensor.
        for lo in range(0, octets.numel(), _UNPACK):
            hi = min(lo + _UNPACK, octets.numel())
            index[lo:hi].copy_(octets[lo:hi])
            torch.index_select(SIGN_TABLE, 0, index[lo:hi], out=signs[lo:hi])
        part.mul_(signs.view(-1)[:n].to(x.device, x.dtype))
    return x


_SIGN_MAPS = {"columns": flip_, "two-sided": two_sided_flip_, "elementwise": element_flip_}


def apply_map_(kind: MapName, seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """The sign map ``kind`` of task ``seed`` on tensor ``name``, in place (self-inverse)."""
    try:
        fn = _SIGN_MAPS[kind]
    except KeyError:
        raise ValueError(f"unknown sign map {kind!r}") from None
    return fn(seed, name, x)


def flip(seed: int, name: str, x: torch.Tensor, kind: MapName = "columns") -> torch.Tensor:
    """Out-of-place apply_map_: a new tensor, x untouched."""
    return apply_map_(kind, seed, name, x.clone(memory_format=torch.contiguous_format))


def side_signs(
    kind: MapName, seed: int, name: str, shape: tuple[int, ...]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(row signs or None, column signs) of a map that acts on rows and columns only.

    For a weight viewed as (shape[0], -1): ``columns`` gives (None, d_c), ``two-sided``
    (d_r, d_c), float32 +1/-1; the map is x -> d_r[:, None] * x * d_c. What a forward pass
    needs to apply the map to activations instead of weights. ``elementwise`` has no
    such factorization (ValueError).
    """
    if kind == "elementwise":
        raise ValueError("the elementwise map does not factor into row and column signs")
    if len(shape) <= 1:
        raise ValueError("rank-0/1 tensors have no rows and columns")
    rows = shape[0]
    cols = math.prod(shape) // rows if rows else 0
    col = sign_vector(seed, name, cols)
    if kind == "columns":
        return None, col
    if kind == "two-sided":
        return row_sign_vector(seed, name, rows), col
    raise ValueError(f"unknown sign map {kind!r}")


class TaskTransform:
    """T_t for one task: which slot each source tensor goes to, and its signs."""

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
        """The sign part of T_t for one source tensor (its placement is slot_of).

        ``inplace=True`` reuses ``delta``'s memory (streaming callers own it).
        """
        if source not in self.layout.flipped:
            return delta
        kind = self.layout.config.map
        if inplace and delta.is_contiguous():
            return apply_map_(kind, self.seed, source, delta)
        return flip(self.seed, source, delta, kind)

    def unscramble_one(
        self, source: str, slot_value: torch.Tensor, *, inplace: bool = False
    ) -> torch.Tensor:
        """Inverse of scramble_one: ``slot_value`` read from ``slot_of(source)``."""
        return self.scramble_one(source, slot_value, inplace=inplace)  # signs: self-inverse

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
