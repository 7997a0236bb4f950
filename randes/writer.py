"""Sharded safetensors output, written atomically and hashed on the way out.

Tensors are buffered until a shard would exceed ``max_shard_bytes``, then serialized
straight from tensor memory (no intermediate byte copy) to a hidden temp file while
its sha256 is computed; the file is fsynced. ``finish`` renames the temp files to their
Hugging Face names, so a crash never leaves a file under a final name half-written.

The serialization is our own, canonical one (tensors ordered by element size, then
name; header keys sorted; padded to 8 bytes like safetensors does): identical inputs
give identical bytes, hence identical content addresses, in any process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from randes.checkpoint import DTYPE_NAMES

_INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class WrittenShard:
    path: Path
    sha256: str
    size: int
    tensors: list[str]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy little-endian byte view of a contiguous CPU tensor."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def serialize(tensors: dict[str, torch.Tensor], out: BinaryIO) -> tuple[str, int]:
    """Write ``tensors`` in safetensors format to ``out``; return (sha256, size)."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256()
    size = 0
    for chunk in [len(raw).to_bytes(8, "little"), raw]:
        out.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    for name in order:
        data = _tensor_bytes(tensors[name])
        out.write(data)
        digest.update(data)
        size += len(data)
    return digest.hexdigest(), size


def write_atomic(path: Path, data: bytes) -> None:
    """Write small bytes (an index, a copied side file) under a final name atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class ShardWriter:
    """Collects named tensors into safetensors shards under ``out_dir``."""

    def __init__(self, out_dir: Path, *, max_shard_bytes: int, prefix: str = "model") -> None:
        if max_shard_bytes <= 0:
            raise ValueError("max_shard_bytes must be positive")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._names: set[str] = set()
        self._temps: list[tuple[Path, str, int, list[str], int]] = []
        self._token = uuid.uuid4().hex
        self._done = False
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; flushes the current shard first if it would overflow."""
        if self._done:
            raise RuntimeError("ShardWriter already finished")
        if name in self._names:
            raise ValueError(f"tensor {name!r} added twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored")
        t = tensor.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() > nbytes:  # a view: do not pin its whole storage
            t = t.clone()
        if self._buffer and self._buffered + nbytes > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._buffer[name] = t
        self._buffered += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        tmp = self.out_dir / f".{self.prefix}.{self._token}.{len(self._temps):05d}.tmp"
        with tmp.open("wb") as fh:
            sha, size = serialize(self._buffer, fh)
            fh.flush()
            os.fsync(fh.fileno())
        self._temps.append((tmp, sha, size, sorted(self._buffer), self._buffered))
        self._buffer = {}
        self._buffered = 0

    def finish(self, *, hf_index: bool = False) -> list[WrittenShard]:
        """Flush, give the shards their final names; [] when nothing was added."""
        if self._done:
            raise RuntimeError("ShardWriter already finished")
        try:
            self._flush()
            n = len(self._temps)
            shards: list[WrittenShard] = []
            weight_map: dict[str, str] = {}
            total = 0
            for i, (tmp, sha, size, names, payload) in enumerate(self._temps, start=1):
                fname = (
                    f"{self.prefix}.safetensors"
                    if n == 1
                    else f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
                )
                final = self.out_dir / fname
                os.replace(tmp, final)
                shards.append(WrittenShard(path=final, sha256=sha, size=size, tensors=names))
                weight_map.update(dict.fromkeys(names, fname))
                total += payload
            self._temps = []
            if hf_index and n > 1:
                index = {
                    "metadata": {"total_size": total},
                    "weight_map": dict(sorted(weight_map.items())),
                }
                write_atomic(
                    self.out_dir / f"{self.prefix}{_INDEX_SUFFIX}",
                    json.dumps(index, indent=2).encode("utf-8"),
                )
            _fsync_dir(self.out_dir)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return shards

    def abort(self) -> None:
        """Drop buffered tensors and delete every temp file written so far."""
        self._buffer = {}
        self._buffered = 0
        for tmp, *_ in self._temps:
            tmp.unlink(missing_ok=True)
        self._temps = []
        self._done = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and not self._done:
            self.abort()
