"""Validating a safetensors header before any tensor is touched, with bounded reads.

A checkpoint's header is attacker-controlled: the 8-byte length is checked against the
file size and a hard cap before exactly that many bytes of JSON are read; the entry
count is bounded from the raw bytes before parsing; every dtype, shape and data offset
is checked, and the offsets must tile the data region exactly. What comes out (each
tensor's `TensorMeta` and absolute byte offset) is what `randes.checkpoint` then reads
exact ranges by, so no number from the file ever sizes an allocation unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from randes.errors import CheckpointError, CorruptCheckpointError
from randes.source import TensorMeta

MAX_HEADER_BYTES = 100 * 1024 * 1024
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


@dataclass(frozen=True)
class FileLayout:
    """One file's validated header: each tensor's meta and where its bytes lie."""

    data_start: int
    metas: dict[str, TensorMeta]
    offsets: dict[str, int]  # absolute byte offset of each tensor in the file


def read_header(path: Path) -> dict[str, TensorMeta]:
    """Validate a safetensors file's header with bounded reads; return its tensors.

    Raises CorruptCheckpointError (one line, naming the file) on any inconsistency.
    """
    return read_layout(path).metas


def read_layout(path: Path) -> FileLayout:
    """`read_header` with each tensor's absolute byte offset (what exact reads need)."""
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
    return FileLayout(start, metas, {k: start + v for k, v in offsets.items()})


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
            raise bad(f"tensor {short_repr(name)}: expected dtype, shape, data_offsets")
        dtype = DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise bad(
                f"tensor {short_repr(name)}: unsupported dtype {short_repr(info['dtype'], 40)}"
            )
        shape = info["shape"]
        if not (type(shape) is list and _nonneg_ints(shape)):
            raise bad(f"tensor {short_repr(name)}: shape must be a list of non-negative integers")
        if len(shape) > MAX_RANK or not _plausible_size(shape):
            raise bad(f"tensor {short_repr(name)}: implausible shape (rank {len(shape)})")
        offsets = info["data_offsets"]
        if not (type(offsets) is list and len(offsets) == 2 and _nonneg_ints(offsets)):
            raise bad(f"tensor {short_repr(name)}: data_offsets must be two non-negative integers")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise bad(
                f"tensor {short_repr(name)}: data_offsets "
                f"[{short_repr(begin, 24)}, {short_repr(end, 24)}] outside the data region"
            )
        meta = TensorMeta(dtype=dtype, shape=tuple(shape))
        if end - begin != meta.nbytes:
            raise bad(
                f"tensor {short_repr(name)}: {end - begin} bytes stored, "
                f"{meta.nbytes} expected for {info['dtype']}{list(shape)}"
            )
        metas[name] = meta
        spans.append((begin, end, name))

    cursor = 0
    for begin, end, name in sorted(spans):
        if begin != cursor:
            what = "overlaps another tensor" if begin < cursor else "leaves a gap"
            raise bad(f"tensor {short_repr(name)} {what} at byte {begin}")
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


def short_repr(name: object, limit: int = 120) -> str:
    """repr of a (possibly attacker-chosen) name, cut so that an error stays one short line."""
    text = repr(name)
    return text if len(text) <= limit else text[: limit - 3] + "..."
