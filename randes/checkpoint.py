"""Lazy, validated reading of safetensors checkpoints (single file, dir, HF shards).

Checkpoints come from outside: a fine-tune uploaded by a customer, a hub download.
So before any tensor is touched the reader

- finds the checkpoint's files and refuses pickle formats (``.bin``, ``.pt``...) and
  links out of its directory (`randes.checkpoint_files`);
- parses every safetensors header itself with bounded reads and checks that the data
  offsets tile the data region exactly (`randes.header`);

and only then reads tensors, one at a time on demand, each with one positional read
of exactly its validated byte range into a fresh tensor (`read_exact_into`). No
attacker-controlled number ever sizes an allocation.

Why not ``safetensors.safe_open``: its tensors live in a copy-on-write memory map
shared by every later read through the same handle (an in-place ``add_`` by a caller
silently changes what the next ``get`` returns), so each would need a clone; one
``readinto`` from the page cache is 4-10x faster than mmap + clone and owns its memory.
The files stay standard safetensors, loadable by ``safetensors.torch.load_file``.

The reader is a `randes.source.TensorSource` (what fold and retrieval read through).
This module re-exports the header and source names (`TensorMeta`, `DTYPES`,
`read_header`...) callers imported from it before it was split by job.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import torch

from randes.checkpoint_files import (
    PICKLE_SUFFIXES,
    check_index,
    check_weight_file,
    confined,
    find_checkpoint_files,
)
from randes.errors import CheckpointError, CorruptCheckpointError, SourceChangedError
from randes.hashio import read_hashing
from randes.header import DTYPE_NAMES, DTYPES, read_header, read_layout, short_repr
from randes.source import Closing, TensorMeta, dtype_size

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "PICKLE_SUFFIXES",
    "Stamp",
    "CheckpointReader",
    "TensorMeta",
    "confined",
    "dtype_size",
    "read_exact_into",
    "read_header",
    "stamp_of",
]


def read_exact_into(
    handles: dict[Path, io.FileIO],
    path: Path,
    offset: int,
    target: torch.Tensor,
    name: str,
    digest: Any = None,
) -> memoryview:
    """Read exactly ``target``'s bytes from ``path`` at ``offset`` into its memory.

    Positional reads (``preadv``: threads may read through one handle) of a
    header-validated range, through a handle cached in ``handles``; a file that shrank
    since its header was read raises CorruptCheckpointError. Returns the bytes' view.
    With ``digest`` the bytes are fed to it as they arrive, each chunk hashed while the
    next is read (`randes.hashio.read_hashing`).
    """
    nbytes = target.numel() * target.element_size()
    try:
        handle = handles.get(path)
        if handle is None:
            handle = handles.setdefault(path, io.FileIO(path, "rb"))
        view = target.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        fd = handle.fileno()
        at = [offset]

        def readinto(buffer: memoryview) -> int:  # positional: threads may share the handle
            n = os.preadv(fd, [buffer], at[0])
            at[0] += n
            return n

        if digest is not None:
            got = read_hashing(readinto, view, [digest])
        else:
            got = 0
            while got < nbytes:
                n = readinto(view[got:])
                if not n:
                    break
                got += n
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {name!r}: {exc.strerror or exc}") from None
    if got != nbytes:
        raise CorruptCheckpointError(f"{path}: truncated while reading {name!r}")
    return view


Stamp = tuple[int, int, int, int, int]
"""(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): what changes when a file is
written in place, truncated, replaced, touched or chmod-ed (ctime cannot be set back)."""


def stamp_of(stat: os.stat_result) -> Stamp:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


class CheckpointReader(Closing):
    """Tensors of one checkpoint, possibly sharded, opened on demand.

    A context manager: ``with CheckpointReader.open(path) as ckpt: ckpt.get(name)``.
    Headers are validated at construction; data is read only by ``get``.
    """

    def __init__(
        self,
        files: Sequence[Path],
        side_files: dict[str, Path] | None = None,
        *,
        expected: dict[str, str] | None = None,
    ) -> None:
        self.files: list[Path] = [Path(f) for f in files]
        self.side_files: dict[str, Path] = dict(side_files or {})
        self.side_sha256: dict[str, str] = {}
        """sha256 of each side file's bytes, once `source_digests` hashed them."""
        self._pinned: dict[str, str] | None = None  # tensor -> sha256 of its bytes
        self._recording = False  # pinned grows: a first read records, a later one checks
        self.weights_dir = ""
        """Subfolder of the source directory holding the weights ('' for its root)."""
        self._metas: dict[str, TensorMeta] = {}
        self._file_of: dict[str, Path] = {}
        self._offset: dict[str, int] = {}
        self._handles: dict[Path, io.FileIO] = {}
        self._stamps: dict[Path, Stamp] = {}
        for path in self.files:
            check_weight_file(path)
            self._stamps[path] = stamp_of(os.stat(path))  # before its header is read
            layout = read_layout(path)
            for name, meta in layout.metas.items():
                if name in self._metas:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {name!r} also in {self._file_of[name]}"
                    )
                self._metas[name] = meta
                self._file_of[name] = path
                self._offset[name] = layout.offsets[name]
        if expected is not None:
            check_index(self._file_of, expected)

    @classmethod
    def open(cls, source: Path, *, confine_to: Path | None = None) -> Self:
        """Open a .safetensors file, or a dir in Hugging Face layout.

        Every file read (weights, index, side files) must lie inside ``confine_to``
        (default: the directory ``source`` is or lies in) once links are resolved
        (`randes.checkpoint_files.confined`): a link out of the checkpoint is refused,
        never followed. Every failure is a `CheckpointError`, including what the
        filesystem says about an odd path (a name too long, a directory that cannot be
        listed).
        """
        source = Path(source)
        try:
            found = find_checkpoint_files(source, confine_to)
            reader = cls(found.files, found.side_files, expected=found.expected)
        except OSError as exc:
            raise CheckpointError(f"{source}: cannot read: {exc.strerror or exc}") from None
        reader.weights_dir = found.weights_dir
        return reader

    @classmethod
    def from_files(cls, files: Sequence[Path]) -> Self:
        if not files:
            raise CheckpointError("no checkpoint files given")
        try:
            return cls(list(files))
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint files: {exc.strerror or exc}") from None

    # -- mapping-like access -------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names, sorted (a stable order for streaming)."""
        return sorted(self._metas)

    def metas(self) -> dict[str, TensorMeta]:
        return {name: self._metas[name] for name in self.keys()}

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def offset(self, name: str) -> int:
        """Absolute byte offset of ``name``'s data in `file_of` (header-validated)."""
        return self._offset[name]

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._metas)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor: a fresh CPU tensor that the caller owns and may modify.

        Exactly the header-validated byte range is read (one positional read); a file
        that shrank or changed since its header was read raises CorruptCheckpointError.
        """
        path = self._file_of[name]
        meta = self._metas[name]
        tensor = torch.empty(meta.shape, dtype=meta.dtype)
        nbytes = meta.nbytes
        if nbytes == 0:
            return tensor
        pinned = self._pinned
        digest = hashlib.sha256() if pinned is not None else None
        read_exact_into(self._handles, path, self._offset[name], tensor, name, digest)
        if digest is not None and pinned is not None:
            want = pinned.get(name)
            if want is None and self._recording:
                pinned[name] = digest.hexdigest()
            elif digest.hexdigest() != want:
                raise SourceChangedError(
                    f"{path}: tensor {short_repr(name)} changed since the checkpoint was "
                    "hashed (rewritten while it was read?); nothing was folded, run it again "
                    "once the file is stable"
                )
        return tensor

    def read_range_into(self, name: str, lo: int, out: torch.Tensor) -> bool:
        """Flat entries ``[lo, lo + out.numel())`` of ``name`` read into ``out`` (a
        contiguous CPU tensor of its dtype): one positional read (``pread``: threads
        may read ranges of one file at once) of part of the validated range. False
        (nothing read) for a pinned reader, whose bytes are checked whole tensor by
        whole tensor: use `get` then."""
        meta = self._metas[name]
        if self._pinned is not None or out.dtype != meta.dtype or not out.is_contiguous():
            return False
        if not 0 <= lo <= lo + out.numel() <= math.prod(meta.shape):
            raise ValueError(f"range [{lo}, {lo + out.numel()}) outside {name!r}")
        if out.numel():
            offset = self._offset[name] + lo * out.element_size()
            read_exact_into(self._handles, self._file_of[name], offset, out, name)
        return True

    def pin(self, tensor_sha256: dict[str, str]) -> None:
        """From now on every `get` checks its bytes against ``tensor_sha256``: what is
        folded is what was hashed (`randes.digests.source_digests` pins the reader it hashes)."""
        self._pinned = dict(tensor_sha256)
        self._recording = False

    def record(self) -> None:
        """Hash while reading: from now on the first `get` of a tensor records the
        sha256 of its bytes and every later one must match it (`randes.digests.
        read_digests` then derives the checkpoint's digest from what the fold read:
        one pass over its bytes for folding and hashing). Tensors pinned already stay."""
        if self._pinned is None:
            self._pinned = {}
        self._recording = True

    @property
    def recorded(self) -> dict[str, str]:
        """tensor -> sha256 of the bytes read so far (pinned or recorded)."""
        return dict(self._pinned or {})

    def check_unchanged(self) -> None:
        """SourceChangedError unless every weight file is the one whose header was
        read: same device, inode, size, mtime and ctime. A write in place, a truncation
        or a replaced file between opening and the last read changes them, so bytes
        hashed while folding cannot mix two versions of a file unnoticed."""
        for path, stamp in self._stamps.items():
            try:
                now = [stamp_of(os.stat(path))]
                handle = self._handles.get(path)
                if handle is not None:
                    now.append(stamp_of(os.fstat(handle.fileno())))
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
            if any(s != stamp for s in now):
                raise SourceChangedError(
                    f"{path}: changed since the checkpoint was hashed and opened (rewritten "
                    "while it was folded?); nothing was folded, run it again once the file "
                    "is stable"
                )

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({[str(f) for f in self.files]!r}, {len(self)} tensors)"
