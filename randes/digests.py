"""A checkpoint's identity, hashed from its bytes, and the reader pinned to it.

What a ledger or task row records must be what was folded. Two ways to get there:

- `read_digests`, after a fold read the checkpoint through a recording reader
  (`CheckpointReader.record`): every tensor was hashed as the fold read it, so the
  digest is derived from the bytes folded, in the same pass (the fold's one read of
  the checkpoint). The reader's files must still be the ones it opened
  (`CheckpointReader.check_unchanged`), so a file rewritten while it was folded is
  refused instead of recording a mix of two versions;
- `source_digests`, a pass of its own before anything is folded (where the digest
  decides whether to fold at all): it pins the reader to the hashes, so a file
  rewritten between hashing and folding is refused at its first read.
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
    """The identities of one checkpoint.

    ``content`` (what ledgers and tasks record from now on) hashes what a fold reads:
    every tensor by name with its dtype, shape and data bytes, and every side file's
    bytes, so the same tensors re-serialized (a header padded or reordered, shards cut
    differently) are the same checkpoint. ``legacy`` is the file-bytes digest that rows
    written before it hold, so a ledger or task row of that era still matches; None
    when it was not computed (a registry without rows of that era needs none).
    """

    content: str
    legacy: str | None = None

    @property
    def all(self) -> tuple[str, ...]:
        return (self.content,) if self.legacy is None else (self.content, self.legacy)


def source_digest(reader: CheckpointReader) -> str:
    """The content digest of `source_digests` (and the reader is pinned to it)."""
    return source_digests(reader, legacy=False).content


def source_digests(reader: CheckpointReader, *, legacy: bool = True) -> SourceDigests:
    """Hash a checkpoint in one pass over its bytes, and pin ``reader`` to what was hashed.

    Every tensor's bytes get their own sha256, which `CheckpointReader.get` then checks
    on each read: a file rewritten between hashing and folding is refused instead of
    folding other bytes than the ones recorded (which would make a later `remove`
    subtract the wrong delta). Side files' digests land in ``reader.side_sha256``.
    ``legacy``: also the file-bytes digest (a second sha256 of the same bytes, on its
    own thread).
    """
    legacy_hex, tensor_sha, side_sha = _hash_pass(reader, legacy=legacy, tensors=True)
    reader.pin(tensor_sha)
    reader.side_sha256 = side_sha
    return SourceDigests(content=_content(reader, tensor_sha, side_sha), legacy=legacy_hex)


def read_digests(reader: CheckpointReader, *, legacy: bool = False) -> SourceDigests:
    """The digests of a checkpoint a fold has just read through ``reader`` recording
    (`CheckpointReader.record`): the tensors it read are hashed already; the ones it
    did not read (none, usually) and the side files are hashed now. Then the reader is
    pinned, and SourceChangedError when a weight file changed since it was opened.
    ``legacy`` costs a pass over the files of its own (the file bytes, in file order).
    """
    tensor_sha = reader.recorded
    for name in reader:
        if name not in tensor_sha:
            tensor_sha[name] = _tensor_sha(reader, name)
    side_sha = {name: _file_sha(path) for name, path in sorted(reader.side_files.items())}
    legacy_hex = _hash_pass(reader, legacy=True, tensors=False)[0] if legacy else None
    reader.pin(tensor_sha)
    reader.side_sha256 = side_sha
    reader.check_unchanged()
    return SourceDigests(content=_content(reader, tensor_sha, side_sha), legacy=legacy_hex)


def _hash_pass(
    reader: CheckpointReader, *, legacy: bool, tensors: bool
) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """One pass over the files: (file-bytes digest when ``legacy``, per-tensor sha256
    when ``tensors``, per-side-file sha256)."""
    file_digest = hashlib.sha256(b"randes/source/v1\n") if legacy else None
    whole = [file_digest] if file_digest is not None else []
    tensor_sha: dict[str, str] = {}
    for path in sorted(reader.files, key=lambda p: p.name):
        names = sorted((reader.offset(n), n) for n in reader if reader.file_of(n) == path)
        try:
            with path.open("rb", buffering=0) as fh:
                _sequential(fh)
                size = os.fstat(fh.fileno()).st_size
                start = names[0][0] if names else size
                if file_digest is not None:
                    _frame(file_digest, b"weights", path.name, size)
                    _copy_into(fh, start, path, file_digest)
                else:
                    fh.seek(start)
                for _, name in names:  # header-validated: the tensors tile the data region
                    one = [hashlib.sha256()] if tensors else []
                    _copy_into(fh, reader.meta(name).nbytes, path, *whole, *one)
                    if one:
                        tensor_sha[name] = one[0].hexdigest()
                if file_digest is not None:  # past the last tensor: the file digest only
                    stream_hashing(fh.readinto, [file_digest])
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    side_sha: dict[str, str] = {}
    for name in sorted(reader.side_files):
        path = reader.side_files[name]
        try:
            with path.open("rb", buffering=0) as fh:
                if file_digest is not None:
                    _frame(file_digest, b"side", name, os.fstat(fh.fileno()).st_size)
                side = hashlib.sha256()
                stream_hashing(fh.readinto, [*whole, side])
                side_sha[name] = side.hexdigest()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return (file_digest.hexdigest() if file_digest is not None else None), tensor_sha, side_sha


def _content(reader: CheckpointReader, tensor_sha: dict[str, str], side_sha: dict[str, str]) -> str:
    content = hashlib.sha256(b"randes/source/v2\n")
    for name in sorted(tensor_sha):
        meta = reader.meta(name)
        dims = ",".join(str(d) for d in meta.shape)
        _field(content, f"tensor {name} {DTYPE_NAMES[meta.dtype]} [{dims}] {tensor_sha[name]}")
    for name, sha in sorted(side_sha.items()):
        _field(content, f"side {name} {sha}")
    return content.hexdigest()


def _tensor_sha(reader: CheckpointReader, name: str) -> str:
    path = reader.file_of(name)
    one = hashlib.sha256()
    try:
        with path.open("rb", buffering=0) as fh:
            fh.seek(reader.offset(name))
            _copy_into(fh, reader.meta(name).nbytes, path, one)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return one.hexdigest()


def _file_sha(path: Path) -> str:
    one = hashlib.sha256()
    try:
        with path.open("rb", buffering=0) as fh:
            stream_hashing(fh.readinto, [one])
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return one.hexdigest()


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
