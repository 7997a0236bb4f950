"""A checkpoint's identity, hashed in one pass over its bytes, and the reader pinned to it.

What a ledger or task row records must be what was folded: `source_digests` hashes every
tensor and side file once and pins the reader to those hashes, so a file rewritten
between hashing and folding is refused at its first read instead of folded silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from randes.checkpoint import CheckpointReader
from randes.errors import CheckpointError, CorruptCheckpointError
from randes.hashio import stream_hashing
from randes.header import DTYPE_NAMES


@dataclass(frozen=True)
class SourceDigests:
    """The identities of one checkpoint, computed in one pass over its bytes.

    ``content`` (what ledgers and tasks record from now on) hashes what a fold reads:
    every tensor by name with its dtype, shape and data bytes, and every side file's
    bytes, so the same tensors re-serialized (a header padded or reordered, shards cut
    differently) are the same checkpoint. ``legacy`` is the file-bytes digest that rows
    written before it hold, so a ledger or task row of that era still matches.
    """

    content: str
    legacy: str

    @property
    def all(self) -> tuple[str, str]:
        return (self.content, self.legacy)


def source_digest(reader: CheckpointReader) -> str:
    """The content digest of `source_digests` (and the reader is pinned to it)."""
    return source_digests(reader).content


def source_digests(reader: CheckpointReader) -> SourceDigests:
    """Hash a checkpoint once, and pin ``reader`` to what was hashed.

    Every tensor's bytes get their own sha256, which `CheckpointReader.get` then checks
    on each read: a file rewritten between hashing and folding is refused instead of
    folding other bytes than the ones recorded (which would make a later `remove`
    subtract the wrong delta). Side files' digests land in ``reader.side_sha256``.
    """
    legacy = hashlib.sha256(b"randes/source/v1\n")
    tensor_sha: dict[str, str] = {}
    for path in sorted(reader.files, key=lambda p: p.name):
        names = sorted((reader.offset(n), n) for n in reader if reader.file_of(n) == path)
        try:
            with path.open("rb", buffering=0) as fh:
                _sequential(fh)
                size = os.fstat(fh.fileno()).st_size
                _frame(legacy, b"weights", path.name, size)
                start = names[0][0] if names else size
                _copy_into(fh, start, path, legacy)
                for _, name in names:
                    one = hashlib.sha256()
                    _copy_into(fh, reader.meta(name).nbytes, path, legacy, one)
                    tensor_sha[name] = one.hexdigest()
                stream_hashing(fh.readinto, [legacy])  # past the last tensor: legacy only
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    side_sha: dict[str, str] = {}
    for name in sorted(reader.side_files):
        path = reader.side_files[name]
        try:
            with path.open("rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                _frame(legacy, b"side", name, size)
                one = hashlib.sha256()
                stream_hashing(fh.readinto, [legacy, one])
                side_sha[name] = one.hexdigest()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    content = hashlib.sha256(b"randes/source/v2\n")
    for name in sorted(tensor_sha):
        meta = reader.meta(name)
        dims = ",".join(str(d) for d in meta.shape)
        _field(content, f"tensor {name} {DTYPE_NAMES[meta.dtype]} [{dims}] {tensor_sha[name]}")
    for name, sha in sorted(side_sha.items()):
        _field(content, f"side {name} {sha}")
    reader.pin(tensor_sha)
    reader.side_sha256 = side_sha
    return SourceDigests(content=content.hexdigest(), legacy=legacy.hexdigest())


def _frame(digest: Any, kind: bytes, name: str, size: int) -> None:
    encoded = name.encode("utf-8", "surrogateescape")
    digest.update(kind + b"\0" + len(encoded).to_bytes(8, "big") + encoded)
    digest.update(size.to_bytes(8, "big"))


def _field(digest: Any, text: str) -> None:
    encoded = text.encode("utf-8", "surrogateescape")
    digest.update(len(encoded).to_bytes(8, "big") + encoded)


def _copy_into(fh: Any, nbytes: int, path: Path, *digests: Any) -> None:
    """Feed the next ``nbytes`` of ``fh`` to every digest (the file must still hold them).

    Large reads into reused buffers, each chunk hashed (every digest on its own
    thread) while the next is read (`randes.hashio.stream_hashing`).
    """
    if stream_hashing(fh.readinto, digests, limit=nbytes) != nbytes:
        raise CorruptCheckpointError(f"{path}: truncated while it was hashed")


def _sequential(fh: Any) -> None:
    """Tell the kernel the file is read once, front to back (larger read-ahead)."""
    if hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
