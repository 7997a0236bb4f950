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
from typing import Any

import numpy as np
import torch

from randes.buffers import ByteBuffers, WorkBuffers
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


class SignMap:
    """The signs of one tensor under one map, applied to any aligned chunk of its entries.

    The one implementation of every sign map: ``flip_``, ``two_sided_flip_`` and
    ``element_flip_`` apply it to a whole tensor, retrieval to one chunk of a tensor's
    flat entries at a time (``apply_(chunk, lo)``), so that a chunked retrieval flips
    exactly what the whole-tensor maps flip. Signs are drawn on the CPU (randes.rng) and
    moved to the chunk's device.

    ``alignment``: chunks must start at, and (but the last) span, multiples of it: whole
    rows for the maps acting on rows and columns, whole sign bytes for the elementwise
    stream.
    """

    def __init__(self, kind: MapName, seed: int, name: str, shape: tuple[int, ...]) -> None:
        if kind not in _MAP_KINDS:
            raise ValueError(f"unknown sign map {kind!r}")
        self.kind, self.seed, self.name = kind, seed, name
        self.numel = math.prod(shape)
        self._cols: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._moved: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}
        self._stream: tuple[int, torch.Tensor] | None = None  # (chunk index, packed signs)
        self._unpacked: tuple[int, torch.Tensor] | None = None  # (chunk index, int8 signs)
        self._words: torch.Tensor | None = None
        self.alignment = 1
        if self.numel == 0 or kind == "elementwise":
            self.alignment = 8
        elif len(shape) <= 1:  # rank-0/1: element-wise signs from sign_vector
            self._cols = sign_vector(seed, name, self.numel)
        else:
            self.alignment = self.numel // shape[0]
            self._cols = sign_vector(seed, name, self.alignment)
            if kind == "two-sided":
                self._rows = row_sign_vector(seed, name, shape[0])

    def apply_(
        self, x: torch.Tensor, lo: int = 0, buffers: WorkBuffers | None = None
    ) -> torch.Tensor:
        """Flip ``x`` in place: flat entries ``[lo, lo + x.numel())`` of the tensor.

        ``x`` may be a float tensor (the values) or int8 (the integer codes of a
        quantized slot, flipped before they are scaled): the same signs either way."""
        n = x.numel()
        if n == 0:
            return x
        if x.dim() != 1 or not x.is_contiguous() or lo % self.alignment:
            raise ValueError("a sign map chunk must be a contiguous, aligned 1-D view")
        if self.kind == "elementwise":
            return self._element_(x, lo, buffers)
        cols = self._on("cols", x)
        if self._rows is None and self.alignment == 1:  # rank-0/1
            return x.mul_(cols[lo : lo + n])
        width = self.alignment
        if n % width:
            raise ValueError("a sign map chunk must hold whole rows")
        rows = x.view(n // width, width).mul_(cols)
        if self._rows is not None:
            r0 = lo // width
            rows.mul_(self._on("rows", x)[r0 : r0 + n // width].unsqueeze(1))
        return x

    def kernel_signs(self, buffers: ByteBuffers | None = None) -> dict[str, Any]:
        """These signs as `randes.kernels.dequant_add_` takes them: the whole packed
        elementwise stream (``ebits``: the stream chunks' bytes back to back, one bit
        per entry, since ELEMENT_CHUNK is a multiple of 8), or int8 column (and row)
        signs with the row ``width`` (rank-0/1: one column sign per entry). With
        ``buffers`` the stream is written in a borrowed buffer, under ``"borrowed"``:
        the caller gives it back when done with the signs."""
        if self.numel == 0:
            return {}
        if self.kind == "elementwise":
            nbytes = -(-self.numel // 8)
            borrowed = buffers.borrow(nbytes) if buffers is not None else None
            stream = borrowed[:nbytes] if borrowed is not None else np.empty(nbytes, np.uint8)
            for c in range(-(-self.numel // ELEMENT_CHUNK)):
                n = min(ELEMENT_CHUNK, self.numel - c * ELEMENT_CHUNK)
                raw = element_sign_bytes(self.seed, self.name, c, n)
                start = c * (ELEMENT_CHUNK // 8)
                stream[start : start + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
            if borrowed is not None:
                return {"ebits": stream, "borrowed": borrowed}
            return {"ebits": stream}
        assert self._cols is not None
        out: dict[str, Any] = {
            "cols": self._cols.to(torch.int8).numpy(),
            "width": self._cols.numel(),  # a row's width; rank-0/1: every entry
        }
        if self._rows is not None:
            out["rows"] = self._rows.to(torch.int8).numpy()
        return out

    def _on(self, which: str, x: torch.Tensor) -> torch.Tensor:
        key = (which, x.device, x.dtype)
        moved = self._moved.get(key)
        if moved is None:
            signs = self._cols if which == "cols" else self._rows
            assert signs is not None
            moved = self._moved[key] = signs.to(device=x.device, dtype=x.dtype)
        return moved

    def _packed(self, chunk: int) -> torch.Tensor:
        """The packed signs of stream chunk ``chunk`` (drawn once, kept for the next
        aligned pieces of the same chunk)."""
        if self._stream is None or self._stream[0] != chunk:
            n = min(ELEMENT_CHUNK, self.numel - chunk * ELEMENT_CHUNK)
            raw = bytearray(element_sign_bytes(self.seed, self.name, chunk, n))
            self._stream = (chunk, torch.frombuffer(raw, dtype=torch.uint8))
        return self._stream[1]

    def _element_(self, x: torch.Tensor, lo: int, buffers: WorkBuffers | None) -> torch.Tensor:
        """Entry i gets sign i of the elementwise stream, drawn one stream chunk
        (ELEMENT_CHUNK entries) at a time, so the extra memory is bounded whatever the
        tensor's size. Float chunks take float signs unpacked per piece; the int8 codes
        of a quantized slot take int8 signs, unpacked once per stream chunk (one table
        word per 8 signs, SIGN_WORDS, from the same table) and sliced by every chunk."""
        pos, end = lo, lo + x.numel()
        while pos < end:
            chunk, off = divmod(pos, ELEMENT_CHUNK)
            n = min(end - pos, ELEMENT_CHUNK - off)
            if x.is_floating_point():
                signs = self._float_signs(chunk, off, n, buffers or WorkBuffers())
            else:
                signs = self._int8_signs(chunk)[off : off + n]
            x[pos - lo : pos - lo + n].mul_(signs.to(x.device, x.dtype))
            pos += n
        return x

    def _float_signs(self, chunk: int, off: int, n: int, bufs: WorkBuffers) -> torch.Tensor:
        octets = self._packed(chunk)[off // 8 : (off + n + 7) // 8]
        cpu = torch.device("cpu")
        index = bufs.take("sign-index", octets.numel(), torch.int32, cpu)
        signs = bufs.take("signs", 8 * octets.numel(), torch.float32, cpu).view(-1, 8)
        # Unpacked in pieces below torch's parallel grain (32768 elements), so they run
        # on the calling thread: on a busy machine each parallel op can wait for a
        # descheduled OpenMP thread, and this leaves one parallel op per piece (the
        # mul_), as few as the column map runs per tensor.
        for a in range(0, octets.numel(), _UNPACK):
            b = min(a + _UNPACK, octets.numel())
            index[a:b].copy_(octets[a:b])
            torch.index_select(SIGN_TABLE, 0, index[a:b], out=signs[a:b])
        return signs.view(-1)[:n]

    def _int8_signs(self, chunk: int) -> torch.Tensor:
        """int8 +1/-1 of every entry of stream chunk ``chunk`` (this map's own buffer,
        at most ELEMENT_CHUNK bytes, refilled per stream chunk)."""
        if self._unpacked is None or self._unpacked[0] != chunk:
            octets = self._packed(chunk)
            words = self._words
            if words is None or words.numel() < octets.numel():
                words = self._words = torch.empty(octets.numel(), dtype=torch.int64)
            torch.index_select(SIGN_WORDS, 0, octets.to(torch.int32), out=words[: octets.numel()])
            self._unpacked = (chunk, words.view(torch.int8))
        return self._unpacked[1]


def flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place column sign flip keyed by (seed, name): x viewed (shape[0], -1) times r.

    Rank-0/1 tensors are flipped element-wise. Exact in any float dtype (signs only).
    Self-inverse. Returns x.
    """
    return _whole("columns", seed, name, x)


def two_sided_flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place D_r x D_c keyed by (seed, name), x viewed (shape[0], -1).

    D_c is flip_'s column signs, D_r independent row signs. Rank-0/1 tensors are flipped
    element-wise exactly as flip_ does. Self-inverse. Returns x.
    """
    return _whole("two-sided", seed, name, x)


_UNPACK = 4096
"""Packed bytes unpacked per piece: 4096 bytes = 32768 signs, torch's parallel grain."""

SIGN_WORDS = SIGN_TABLE.to(torch.int8).view(torch.int64).view(-1)
"""SIGN_TABLE as int8 +1/-1, the 8 signs of byte b packed in word b: the signs of the int8
codes of a quantized slot are one gather of one word per 8 entries."""


def element_flip_(seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    """In-place independent sign per entry keyed by (seed, name), any rank.

    Entry i of the flattened tensor gets sign i of the elementwise stream; the signs are
    drawn one chunk (ELEMENT_CHUNK entries, 4 MiB as float32) at a time and dropped, so
    the extra memory is one chunk whatever the tensor's size. Self-inverse. Returns x.
    """
    return _whole("elementwise", seed, name, x)


def _whole(kind: MapName, seed: int, name: str, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == 0:
        return x
    _check(x)
    SignMap(kind, seed, name, tuple(x.shape)).apply_(x.view(-1))
    return x


_SIGN_MAPS = {"columns": flip_, "two-sided": two_sided_flip_, "elementwise": element_flip_}
_MAP_KINDS = frozenset(_SIGN_MAPS)


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

    def signs(self, source: str, shape: tuple[int, ...]) -> SignMap | None:
        """The sign part of T_t for ``source`` as a chunkable map (None: not flipped)."""
        if source not in self.layout.flipped:
            return None
        return SignMap(self.layout.config.map, self.seed, source, shape)

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
