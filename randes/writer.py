"""Sharded safetensors output, streamed tensor by tensor, written atomically and hashed.

The writer is given a plan up front: every output tensor's (name, dtype, shape), which
fold and materialize know from the readers' headers before computing anything. From it
the shards are laid out at construction (tensors assigned to shards in plan order, a new
shard started when the next tensor would push the current one past ``max_shard_bytes``),
so each shard's header is known before its first tensor exists. ``add`` then writes the
header of a shard when that shard's first tensor arrives and appends every tensor's raw
bytes straight from tensor memory as it comes, updating the shard's sha256 on the way:
nothing is buffered, so a writer holds at most the one tensor it is handed.

Each shard goes to a hidden temp file, fsynced when its last tensor is written;
``finish`` renames the temp files to their Hugging Face names, so a crash never leaves a
file under a final name half-written.

Byte layout is canonical: within a shard tensors are stored by element size (largest
first, so every tensor is aligned to its element size), then by name; header keys are
sorted and the header padded with spaces to 8 bytes, as safetensors allows. ``order``
is the sequence in which ``add`` must be called (shard by shard, canonical within each):
identical plans and tensors give identical bytes, hence identical content addresses, in
any process and whatever the order of the plan within a shard.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from randes.atomic import fsync_dir, write_atomic
from randes.hashio import update_while
from randes.header import DTYPE_NAMES
from randes.source import TensorMeta, dtype_size

_INDEX_SUFFIX = ".safetensors.index.json"
_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    sha256: str
    size: int
    tensors: list[str]


@dataclass(frozen=True)
class TensorSpec:
    """One planned output tensor: what its header entry will say."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, meta: TensorMeta | torch.Tensor) -> TensorSpec:
        """The spec of a reader's TensorMeta, or of an existing tensor."""
        return cls(name, meta.dtype, tuple(meta.shape))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)


@dataclass(frozen=True)
class _ShardPlan:
    specs: tuple[TensorSpec, ...]  # in storage (= add) order
    header: bytes  # 8-byte length + padded JSON
    payload: int  # tensor bytes


def _shard_plan(specs: list[TensorSpec]) -> _ShardPlan:
    ordered = sorted(specs, key=lambda s: (-dtype_size(s.dtype), s.name))
    header: dict[str, object] = {"__metadata__": _METADATA}
    offset = 0
    for spec in ordered:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return _ShardPlan(tuple(ordered), len(raw).to_bytes(8, "little") + raw, offset)


def _plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[_ShardPlan]:
    """Group ``specs`` into shards, in plan order, each within ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    filled = 0
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ValueError(f"tensor {spec.name!r} planned twice")
        if spec.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {spec.name!r}: dtype {spec.dtype} cannot be stored")
        if any(d < 0 for d in spec.shape):
            raise ValueError(f"tensor {spec.name!r}: negative dimension in {list(spec.shape)}")
        seen.add(spec.name)
        if current and filled + spec.nbytes > max_shard_bytes:
            shards.append(current)
            current, filled = [], 0
        current.append(spec)
        filled += spec.nbytes
    if current:
        shards.append(current)
    return [_shard_plan(s) for s in shards]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


@dataclass(frozen=True)
class _Written:
    tmp: Path
    sha256: str
    size: int
    names: list[str]
    payload: int


class ShardWriter:
    """Streams the planned tensors into safetensors shards under ``out_dir``.

    ``plan`` lists every tensor that will be added (name, dtype, shape); ``add`` must
    then be called exactly in ``order``, with tensors of the planned dtype and shape.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        max_shard_bytes: int,
        plan: Iterable[TensorSpec],
        prefix: str = "model",
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors is little-endian
            raise RuntimeError("ShardWriter writes raw tensor memory: needs a little-endian host")
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._shards = _plan_shards(plan, max_shard_bytes)
        self._order = [spec for shard in self._shards for spec in shard.specs]
        self._position = {spec.name: i for i, spec in enumerate(self._order)}
        self._ends: list[int] = []  # index in _order just past each shard's last tensor
        for shard in self._shards:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(shard.specs))
        self._next = 0  # index in _order of the next tensor expected
        self._shard = 0  # index of the shard being written
        self._fh: BinaryIO | None = None
        self._tmp: Path | None = None
        self._digest = hashlib.sha256()
        self._size = 0
        self._written: list[_Written] = []
        self._token = uuid.uuid4().hex
        self._done = False
        self.out_dir.mkdir(parents=True, exist_ok=True)

    @property
    def order(self) -> list[str]:
        """The names of the planned tensors, in the order ``add`` takes them."""
        return [spec.name for spec in self._order]

    @property
    def remaining(self) -> int:
        """How many planned tensors have not been added yet."""
        return len(self._order) - self._next

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; refused (nothing written) if it is not that one."""
        if self._done:
            raise RuntimeError("ShardWriter already finished")
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} was not planned (all planned tensors were added)")
        spec = self._order[self._next]
        if name != spec.name:
            at = self._position.get(name)
            why = "not planned" if at is None else "added twice" if at < self._next else "early"
            raise ValueError(f"tensor {name!r} {why}: expected {spec.name!r} next (see .order)")
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: got {tensor.dtype}{list(tensor.shape)}, "
                f"planned {spec.dtype}{list(spec.shape)}"
            )
        shard = self._shards[self._shard]
        try:
            if self._fh is None:
                self._open(shard)
            assert self._fh is not None
            data = _tensor_bytes(tensor.detach().to("cpu").contiguous())
            fh = self._fh
            update_while(
                [self._digest], data, functools.partial(fh.write, data)
            )  # hashed as written
            self._size += len(data)
            del data
            self._next += 1
            if self._next == self._ends[self._shard]:
                self._close(shard)
        except BaseException:  # a shard half written: nothing more can go in
            self.abort()
            raise

    def _open(self, shard: _ShardPlan) -> None:
        tmp = self.out_dir / f".{self.prefix}.{self._token}.{self._shard:05d}.tmp"
        self._tmp = tmp
        self._fh = tmp.open("wb")
        self._digest = hashlib.sha256(shard.header)
        self._fh.write(shard.header)
        self._size = len(shard.header)

    def _close(self, shard: _ShardPlan) -> None:
        assert self._fh is not None and self._tmp is not None
        fh, self._fh = self._fh, None
        with fh:
            fh.flush()
            os.fsync(fh.fileno())
        expected = len(shard.header) + shard.payload
        if self._size != expected:  # pragma: no cover - guarded by the dtype/shape check
            raise RuntimeError(f"shard {self._tmp}: wrote {self._size} bytes, planned {expected}")
        names = sorted(spec.name for spec in shard.specs)
        self._written.append(
            _Written(self._tmp, self._digest.hexdigest(), self._size, names, shard.payload)
        )
        self._tmp = None
        self._shard += 1

    def finish(self, *, hf_index: bool = False) -> list[WrittenShard]:
        """Give the shards their final names; [] when nothing was planned.

        Every planned tensor must have been added.
        """
        if self._done:
            raise RuntimeError("ShardWriter already finished")
        try:
            if self._next < len(self._order):
                missing = self._order[self._next].name
                raise ValueError(
                    f"{len(self._order) - self._next} planned tensors were never added "
                    f"(next: {missing!r})"
                )
            n = len(self._written)
            shards: list[WrittenShard] = []
            weight_map: dict[str, str] = {}
            total = 0
            for i, w in enumerate(self._written, start=1):
                fname = (
                    f"{self.prefix}.safetensors"
                    if n == 1
                    else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
                )
                final = self.out_dir / fname
                os.replace(w.tmp, final)
                shards.append(
                    WrittenShard(path=final, sha256=w.sha256, size=w.size, tensors=w.names)
                )
                weight_map.update(dict.fromkeys(w.names, fname))
                total += w.payload
            self._written = []
            if hf_index and n > 1:
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                write_atomic(
                    self.out_dir / f"{self.prefix}{_INDEX_SUFFIX}",
                    json.dumps(index, indent=2).encode("utf-8"),
                )
            fsync_dir(self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return shards

    def abort(self) -> None:
        """Close the shard being written and delete every temp file written so far."""
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        for w in self._written:
            w.tmp.unlink(missing_ok=True)
        self._written = []
        self._done = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()
