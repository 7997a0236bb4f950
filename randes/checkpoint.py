"""Lazy, validated reading of safetensors checkpoints (single file, dir, HF shards).

Checkpoints come from outside: a fine-tune uploaded by a customer, a hub download.
So before any tensor is touched the reader

- refuses pickle formats (``.bin``, ``.pt``...) outright: unpickling runs code;
- parses every safetensors header itself with bounded reads (8-byte length checked
  against the file size and a hard cap, then exactly that many bytes of JSON), checks
  dtypes, shapes and that the data offsets tile the data region exactly;

and only then reads tensors, one at a time on demand, each with one positional read
of exactly its validated byte range into a fresh tensor. No attacker-controlled number
ever sizes an allocation.

Why not ``safetensors.safe_open``: its tensors live in a copy-on-write memory map
shared by every later read through the same handle (an in-place ``add_`` by a caller
silently changes what the next ``get`` returns), so each would need a clone; one
``readinto`` from the page cache is 4-10x faster than mmap + clone and owns its memory.
The files stay standard safetensors, loadable by ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import torch

from randes.errors import (
    CheckpointError,
    CorruptCheckpointError,
    SourceChangedError,
    UnsafeCheckpointError,
)
from randes.sidefiles import collect_side_files, st_weights_dir

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 100 * 1024 * 1024
MAX_TENSORS = 65_536
"""Most tensors one safetensors file may declare. Real files hold a few thousand at
most (an MoE's experts are sharded: ~600 per file for DeepSeek-V3); the bound keeps
what parsing a hostile header costs near 50 MB and a second."""
MAX_RANK = 64
"""Most dimensions a tensor may have (real checkpoints use at most a handful)."""
MAX_ELEMENTS = 2**48
"""Bound on the product of a shape's dimensions, empty (0) dimensions counted as 1.

A header may declare a zero-size tensor with absurd dimensions (``[0, 2**62, 2**62]``):
it stores no bytes, so the byte-count check passes, yet torch cannot even describe it
(its strides overflow int64). The product is computed with an early exit, so a shape
of thousands of huge numbers costs no big-integer arithmetic either."""
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors$")
_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a header says about a tensor: enough to plan a fold without reading data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


_DTYPE_SIZES: dict[torch.dtype, int] = {}


def dtype_size(dtype: torch.dtype) -> int:
    size = _DTYPE_SIZES.get(dtype)
    if size is None:
        size = _DTYPE_SIZES[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


@dataclass(frozen=True)
class _FileLayout:
    data_start: int
    metas: dict[str, TensorMeta]
    offsets: dict[str, int]  # absolute byte offset of each tensor in the file


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Validate a safetensors file's header with bounded reads; return its tensors.

    Raises CorruptCheckpointError (one line, naming the file) on any inconsistency.
    """
    return _read_layout(path).metas


def _read_layout(path: Path) -> _FileLayout:
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{path}: file too short for a safetensors header")
            n = int.from_bytes(prefix, "little")
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CorruptCheckpointError(
                    f"{path}: absurd safetensors header length {n} (file is {size} bytes)"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) != n:
        raise CorruptCheckpointError(f"{path}: truncated safetensors header")
    held = [raw]
    del raw  # the parser drops the bytes once decoded: a 16 MiB header is not held 3 times
    metas, offsets = _parse_header(path, held, data_len=size - 8 - n)
    start = 8 + n
    return _FileLayout(start, metas, {k: start + v for k, v in offsets.items()})


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # built in C: a header of 65k tensors parses in well under a second
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return out


def _no_duplicates_possible(counts: tuple[int, int, int, int], header: object) -> bool:
    """True when the plain parse cannot have dropped a duplicate key: as many top-level
    tensor entries as the raw text names ``"data_offsets"``, ``"dtype"`` and ``"shape"``
    (``counts``, with ``"__metadata__"``; a duplicate would leave fewer entries than
    names). Otherwise the header is parsed again with `_no_duplicates`, which names the
    duplicate."""
    if not isinstance(header, dict):
        return True  # refused as "not a JSON object" anyway
    declared, dtypes, shapes, metadata = counts
    entries = len(header) - ("__metadata__" in header)
    return entries == declared == dtypes == shapes and metadata == ("__metadata__" in header)


def _parse_header(
    path: Path, held: list[bytes], *, data_len: int
) -> tuple[dict[str, TensorMeta], dict[str, int]]:
    """Parse the header bytes ``held[0]`` (taken out of the list, so that they are freed
    once decoded)."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: corrupt safetensors header: {why}")

    # An upper bound on the entries, before any parsing: every tensor names its
    # data_offsets. Parsing costs ~1 KB of Python objects per entry, so this bounds the
    # memory (and time) a refusal costs, whatever the header claims.
    raw = held.pop()
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise bad(f"{declared} tensors declared, more than the {MAX_TENSORS} one file may hold")
    counts = (declared, raw.count(b'"dtype"'), raw.count(b'"shape"'), raw.count(b'"__metadata__"'))
    try:
        text = raw.decode("utf-8")
        del raw
        header = json.loads(text)  # the C parser, no Python call per object
        if not _no_duplicates_possible(counts, header):
            header = json.loads(text, object_pairs_hook=_no_duplicates)  # exact, slower
        del text
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"malformed JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(header, dict):
        raise bad("not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise bad("__metadata__ must map strings to strings")

    metas: dict[str, TensorMeta] = {}
    spans: list[tuple[int, int, str]] = []
    for name in list(header):
        info = header.pop(name)  # each parsed entry freed as its TensorMeta is made
        if not (
            type(info) is dict
            and len(info) == 3
            and "dtype" in info
            and "shape" in info
            and "data_offsets" in info
        ):
            raise bad(f"tensor {_short(name)}: expected dtype, shape, data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(f"tensor {_short(name)}: unsupported dtype {_short(info['dtype'], 40)}")
        shape = info["shape"]
        if not (type(shape) is list and _nonneg_ints(shape)):
            raise bad(f"tensor {_short(name)}: shape must be a list of non-negative integers")
        if len(shape) > MAX_RANK or not _plausible_size(shape):
            raise bad(f"tensor {_short(name)}: implausible shape (rank {len(shape)})")
        offsets = info["data_offsets"]
        if not (type(offsets) is list and len(offsets) == 2 and _nonneg_ints(offsets)):
            raise bad(f"tensor {_short(name)}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise bad(
                f"tensor {_short(name)}: data_offsets [{_short(begin, 24)}, {_short(end, 24)}] "
                "outside the data region"
            )
        meta = TensorMeta(dtype=dtype, shape=tuple(shape))
        if end - begin != meta.nbytes:
            raise bad(
                f"tensor {_short(name)}: {end - begin} bytes stored, "
                f"{meta.nbytes} expected for {info['dtype']}{list(shape)}"
            )
        metas[name] = meta
        spans.append((begin, end, name))

    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            what = "overlaps another tensor" if begin < cursor else "leaves a gap"
            raise bad(f"tensor {_short(name)} {what} at byte {begin}")
        cursor = end
    if cursor != data_len:
        raise bad(f"data region is {data_len} bytes, tensors cover {cursor}")
    return metas, {name: begin for begin, _, name in spans}


def _nonneg_ints(values: list[Any]) -> bool:
    """Every value a non-negative int (``type is int``: bool is refused, as JSON's true)."""
    return all(type(value) is int and value >= 0 for value in values)


def _plausible_size(shape: list[int]) -> bool:
    """prod(max(d, 1) for d in shape) <= MAX_ELEMENTS, without ever building a big product."""
    total = 1
    for dim in shape:
        if dim > MAX_ELEMENTS:
            return False
        total *= max(dim, 1)
        if total > MAX_ELEMENTS:
            return False
    return True


def _short(name: object, limit: int = 120) -> str:
    """repr of a (possibly attacker-chosen) name, cut so that an error stays one short line."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_exact_into(
    handles: dict[Path, io.FileIO], path: Path, offset: int, target: torch.Tensor, name: str
) -> memoryview:
    """Read exactly ``target``'s bytes from ``path`` at ``offset`` into its memory.

    One positional read of a header-validated range, through a handle cached in
    ``handles``; a file that shrank since its header was read raises
    CorruptCheckpointError. Returns the bytes' view (for a hash of what was read).
    """
    nbytes = target.numel() * target.element_size()
    try:
        handle = handles.get(path)
        if handle is None:
            handle = handles[path] = io.FileIO(path, "rb")
        view = target.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        handle.seek(offset)
        got = 0
        while got < nbytes:
            n = handle.readinto(view[got:])
            if not n:
                break
            got += n
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read {name!r}: {exc.strerror or exc}") from None
    if got != nbytes:
        raise CorruptCheckpointError(f"{path}: truncated while reading {name!r}")
    return view


class CheckpointReader:
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
        self.weights_dir = ""
        """Subfolder of the source directory holding the weights ('' for its root)."""
        self._metas: dict[str, TensorMeta] = {}
        self._file_of: dict[str, Path] = {}
        self._offset: dict[str, int] = {}
        self._handles: dict[Path, io.FileIO] = {}
        for path in self.files:
            _refuse_pickle(path)
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: not a .safetensors file")
            if not path.is_file():
                raise CheckpointError(f"{path}: no such file")
            layout = _read_layout(path)
            for name, meta in layout.metas.items():
                if name in self._metas:
                    raise CorruptCheckpointError(
                        f"{path}: tensor {name!r} also in {self._file_of[name]}"
                    )
                self._metas[name] = meta
                self._file_of[name] = path
                self._offset[name] = layout.offsets[name]
        if expected is not None:
            _check_index(self._file_of, expected)

    @classmethod
    def open(cls, source: Path, *, confine_to: Path | None = None) -> Self:
        """Open a .safetensors file, or a dir in Hugging Face layout.

        Every file read (weights, index, side files) must lie inside ``confine_to``
        (default: the directory ``source`` is or lies in) once links are resolved
        (`confined`): a link out of the checkpoint is refused, never followed.
        Every failure is a `CheckpointError`, including what the filesystem says about
        an odd path (a name too long, a directory that cannot be listed).
        """
        source = Path(source)
        try:
            return cls._open(source, confine_to)
        except OSError as exc:
            raise CheckpointError(f"{source}: cannot read: {exc.strerror or exc}") from None

    @classmethod
    def _open(cls, source: Path, confine_to: Path | None) -> Self:
        if not source.exists():
            raise CheckpointError(f"{source}: no such file or directory")
        if source.is_file():
            _refuse_pickle(source)
            if source.suffix != ".safetensors":
                raise CheckpointError(f"{source}: not a .safetensors file")
            root = confine_to or source.parent
            side = _side_files(source.parent, root) if _is_hf_weight_name(source.name) else {}
            return cls([confined(source, root)], side)
        if not source.is_dir():
            raise CheckpointError(f"{source}: not a file or directory")
        return cls._open_dir(source, confine_to or source)

    @classmethod
    def _open_dir(cls, root: Path, allowed: Path) -> Self:
        side = _side_files(root, allowed)
        index = root / INDEX_FILE
        single = root / SINGLE_FILE
        if single.is_file():
            # transformers' own precedence (modeling_utils: model.safetensors before
            # its index): the file from_pretrained loads is the one folded, even when
            # an index and shards lie next to it.
            if index.exists():
                log.warning(
                    "%s holds both %s and %s: folding %s, which transformers' "
                    "from_pretrained loads first",
                    root,
                    SINGLE_FILE,
                    INDEX_FILE,
                    SINGLE_FILE,
                )
            return cls([confined(single, allowed)], side)
        if index.is_file():
            files, expected = _read_index(confined(index, allowed))
            return cls([confined(f, allowed) for f in files], side, expected=expected)
        weights = sorted(p for p in root.iterdir() if p.suffix == ".safetensors" and p.is_file())
        if len(weights) == 1:
            return cls([confined(weights[0], allowed)], side)
        if weights:
            shards = _complete_shard_set(root, weights)
            return cls([confined(f, allowed) for f in shards], side)
        sub = st_weights_dir(root)
        if sub is not None:  # sentence-transformers' legacy layout: weights in 0_Transformer/
            reader = cls._open_dir(root.joinpath(*sub.split("/")), allowed)
            reader.side_files = side
            reader.weights_dir = sub
            return reader
        if any(p.suffix in PICKLE_SUFFIXES for p in root.iterdir()):
            raise UnsafeCheckpointError(
                f"{root}: only pickle checkpoints (.bin/.pt) found; they can run code on load, "
                "convert them to safetensors"
            )
        raise CheckpointError(f"{root}: no safetensors weights in directory")

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
        view = read_exact_into(self._handles, path, self._offset[name], tensor, name)
        if self._pinned is not None and hashlib.sha256(view).hexdigest() != self._pinned[name]:
            raise SourceChangedError(
                f"{path}: tensor {_short(name)} changed since the checkpoint was hashed "
                "(rewritten while it was read?); nothing was folded, run it again once "
                "the file is stable"
            )
        return tensor

    def pin(self, tensor_sha256: dict[str, str]) -> None:
        """From now on every `get` checks its bytes against ``tensor_sha256``: what is
        folded is what was hashed (`source_digests` pins the reader it hashes)."""
        self._pinned = dict(tensor_sha256)

    def close(self) -> None:
        handles, self._handles = self._handles, {}
        for handle in handles.values():
            handle.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({[str(f) for f in self.files]!r}, {len(self)} tensors)"


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsafeCheckpointError(
            f"{path}: pickle checkpoint refused (it can run code on load); "
            "convert it to safetensors"
        )


def _is_hf_weight_name(name: str) -> bool:
    return name == SINGLE_FILE or _SHARD.match(name) is not None


def confined(path: Path, root: Path) -> Path:
    """``path`` with its links resolved, refused unless it lies inside ``root``.

    The one rule for every file read from a checkpoint (weights, index, shards the index
    names, side files such as config.json): a link may point within the checkpoint's
    directory (Hugging Face's cache links snapshots to its blobs), never out of it, so
    a crafted checkpoint cannot make the pipeline copy /etc/shadow or ~/.aws/credentials
    into a store that serves it back. ``path`` itself is returned: its name is the one
    the checkpoint uses (an index names shards, a digest frames weight files by it).
    """
    real = Path(path).resolve()
    inside = Path(root).resolve()
    if real != inside and not real.is_relative_to(inside):
        raise UnsafeCheckpointError(
            f"{_short(str(path), 160)}: a link to {_short(str(real), 160)}, outside the "
            f"checkpoint directory {_short(str(root), 160)}; refused (copy the file in instead)"
        )
    return Path(path)


def _side_files(root: Path, allowed: Path) -> dict[str, Path]:
    """The side files of ``root`` (`randes.sidefiles`), each `confined` to ``allowed``."""
    return {name: confined(path, allowed) for name, path in collect_side_files(root).items()}


def _read_index(index: Path) -> tuple[list[Path], dict[str, str]]:
    """Parse model.safetensors.index.json: the shard files and tensor -> file map."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{index}: index file too large")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CorruptCheckpointError(f"{index}: malformed JSON") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f"{index}: missing or empty weight_map")
    names: set[str] = set()
    for tensor, fname in weight_map.items():
        if (
            not isinstance(fname, str)
            or Path(fname).name != fname
            or fname in (".", "..")
            or not fname.endswith(".safetensors")
        ):
            raise CorruptCheckpointError(f"{index}: bad shard name {fname!r} for {tensor!r}")
        names.add(fname)
    files = [index.parent / n for n in sorted(names)]
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {path.name} is missing")
    return files, {t: f for t, f in weight_map.items()}


def _check_index(file_of: dict[str, Path], expected: dict[str, str]) -> None:
    for tensor, fname in expected.items():
        actual = file_of.get(tensor)
        if actual is None or actual.name != fname:
            raise CorruptCheckpointError(
                f"{INDEX_FILE}: {tensor!r} is not in {fname} as the index says"
            )
    extra = set(file_of) - set(expected)
    if extra:
        raise CorruptCheckpointError(
            f"{INDEX_FILE}: {len(extra)} tensors in the shards are missing from the index "
            f"(e.g. {sorted(extra)[0]!r})"
        )


def _complete_shard_set(root: Path, weights: list[Path]) -> list[Path]:
    """Several .safetensors without an index: accept only one complete HF shard set."""
    matches = [_SHARD.match(p.name) for p in weights]
    if not all(matches):
        raise CheckpointError(
            f"{root}: several .safetensors files and no {INDEX_FILE}; cannot tell which "
            "make up the model"
        )
    groups = {(m.group("prefix"), m.group("n")) for m in matches if m}
    indices = sorted(int(m.group("i")) for m in matches if m)
    if len(groups) != 1:
        raise CheckpointError(f"{root}: shards of several models in one directory")
    total = int(next(iter(groups))[1])
    if indices != list(range(1, total + 1)):
        raise CheckpointError(f"{root}: incomplete shard set ({len(indices)} of {total})")
    return weights


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
        names = sorted((reader._offset[n], n) for n, f in reader._file_of.items() if f == path)
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                _frame(legacy, b"weights", path.name, size)
                start = names[0][0] if names else size
                _copy_into(fh, start, path, legacy)
                for _, name in names:
                    one = hashlib.sha256()
                    _copy_into(fh, reader._metas[name].nbytes, path, legacy, one)
                    tensor_sha[name] = one.hexdigest()
                while chunk := fh.read(_CHUNK):  # bytes past the last tensor: legacy only
                    legacy.update(chunk)
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    side_sha: dict[str, str] = {}
    for name in sorted(reader.side_files):
        path = reader.side_files[name]
        try:
            with path.open("rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                _frame(legacy, b"side", name, size)
                one = hashlib.sha256()
                while chunk := fh.read(_CHUNK):
                    legacy.update(chunk)
                    one.update(chunk)
                side_sha[name] = one.hexdigest()
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    content = hashlib.sha256(b"randes/source/v2\n")
    for name in sorted(tensor_sha):
        meta = reader._metas[name]
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
    """Feed the next ``nbytes`` of ``fh`` to every digest (the file must still hold them)."""
    remaining = nbytes
    while remaining:
        chunk = fh.read(min(_CHUNK, remaining))
        if not chunk:
            raise CorruptCheckpointError(f"{path}: truncated while it was hashed")
        for digest in digests:
            digest.update(chunk)
        remaining -= len(chunk)
