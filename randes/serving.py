"""Serving superpositions: the quantized copy of a version's fp32 master, written and read.

Writing (`ServingWriter`): fold hands every slot to it right after the master writer, the
value already in memory, so the serving copy costs no second pass over any data. Codes
and scales go to two writers (``codes*.safetensors``, ``scales*.safetensors``): a
ShardWriter stores a shard's tensors largest element first, so one shard mixing float32
scales and uint8 codes could not take any code before every scale of the shard, which
would hold a whole shard of codes in memory. With one dtype per writer the only
reordering left is by name within a shard (``a.q`` sorts after ``a.b.q`` although ``a``
sorts before ``a.b``), absorbed by a small buffer that in practice holds nothing.

Reading (`QuantizedReader`): a `randes.source.TensorSource` whose keys, headers and
tensors are those of the master it was derived from (slot names, base shapes, the
superposition dtype), each tensor dequantized on demand. Retrieval and materialize take
it unchanged.
Every code and scale tensor is checked against the sizes `QuantScheme.layout` predicts
before anything is read, so a serving copy that does not fit the base fails in one line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from randes.buffers import WorkBuffers
from randes.errors import IncompatibleCheckpointError, NonFiniteTensorError
from randes.quantize import (
    CODES_SUFFIX,
    SCALES_SUFFIX,
    QuantizedTensor,
    QuantScheme,
    chunk_alignment,
    dequantize,
    dequantize_range,
    quantize,
)
from randes.retrieval_inputs import PageDrops
from randes.source import ClosableSource, Closing, MetaTable, TensorMeta, TensorSource
from randes.writer import ShardWriter, TensorSpec, WrittenShard

SERVING_DIR = "serving"


def codes_name(slot: str) -> str:
    return slot + CODES_SUFFIX


def scales_name(slot: str) -> str:
    return slot + SCALES_SUFFIX


def serving_specs(
    slots: Sequence[tuple[str, tuple[int, ...]]], scheme: QuantScheme
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(codes specs, scales specs) of the serving copy of ``slots`` (name, shape), in order."""
    codes: list[TensorSpec] = []
    scales: list[TensorSpec] = []
    for slot, shape in slots:
        n_codes, n_scales = scheme.layout(tuple(shape))
        codes.append(TensorSpec(codes_name(slot), torch.uint8, (n_codes,)))
        scales.append(TensorSpec(scales_name(slot), torch.float32, (n_scales,)))
    return codes, scales


class _InOrder:
    """Feeds a ShardWriter in its required order, holding early arrivals until their turn."""

    def __init__(self, writer: ShardWriter) -> None:
        self.writer = writer
        self._order = writer.order
        self._next = 0
        self._pending: dict[str, torch.Tensor] = {}

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._pending[name] = tensor
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            ready = self._order[self._next]
            self.writer.add(ready, self._pending.pop(ready))
            self._next += 1


class ServingWriter:
    """Streams the quantized copy of a superposition under ``out_dir``, slot by slot.

    ``slots`` lists every (slot, shape) that will be added, in the order ``add`` will be
    called (the master writer's order); ``add`` takes the master's stored value.
    """

    def __init__(
        self,
        out_dir: Path,
        *,
        scheme: QuantScheme,
        slots: Sequence[tuple[str, tuple[int, ...]]],
        max_shard_bytes: int,
    ) -> None:
        self.scheme = scheme
        codes, scales = serving_specs(slots, scheme)
        self._codes = ShardWriter(
            out_dir, max_shard_bytes=max_shard_bytes, plan=codes, prefix="codes"
        )
        self._scales = ShardWriter(
            out_dir, max_shard_bytes=max_shard_bytes, plan=scales, prefix="scales"
        )
        self._codes_feed = _InOrder(self._codes)
        self._scales_feed = _InOrder(self._scales)

    def add(self, slot: str, value: torch.Tensor) -> None:
        """Quantize one master slot (any float dtype) and write its codes and scales."""
        q = quantize(value, self.scheme)
        if not bool(torch.isfinite(q.scales).all()):  # the master is checked by the fold
            raise NonFiniteTensorError(f"serving copy of slot {slot!r} is not finite")
        self._codes_feed.put(codes_name(slot), q.codes)
        self._scales_feed.put(scales_name(slot), q.scales)

    def finish(self) -> list[WrittenShard]:
        try:
            return [*self._codes.finish(), *self._scales.finish()]
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self._codes.abort()
        self._scales.abort()


@runtime_checkable
class LendingSource(Protocol):
    """A source that can lend a tensor in place (a mapping of its verified file) and
    take it back: the codes a `QuantizedReader` dequantizes are then never copied into
    the process (storage.file_maps.MappedCheckpointReader)."""

    def mapped(self, name: str) -> torch.Tensor | None:
        """``name`` over the source's own memory, read-only by contract; None: read it."""
        ...

    def release(self, name: str) -> None:
        """Done with what `mapped` lent of ``name``."""
        ...

    def page_drops(self, name: str) -> PageDrops | None:
        """How compiled code drops the pages `mapped` lent of ``name`` (None: it lent
        from the process's memory, nothing to drop)."""
        ...


class QuantizedReader(MetaTable, Closing):
    """A serving copy read as the master superposition it was derived from.

    ``slots`` maps each slot name to the master's meta (base shape, superposition
    dtype); ``get`` returns the dequantized float32 values cast to that dtype. The
    wrapped source (a `CheckpointReader` over the codes and scales files, or the
    runtime's resident copy of them) is owned: closing this closes it.

    A `TensorSource` with the master's keys and headers, so retrieval, materialize and
    their checks take it where they take a master reader, without a line of them
    changing.
    """

    def __init__(
        self, inner: ClosableSource, scheme: QuantScheme, slots: Mapping[str, TensorMeta]
    ) -> None:
        self.scheme = scheme
        self._inner = inner
        _check_layout(inner, scheme, slots)
        self._metas = {slot: slots[slot] for slot in sorted(slots)}
        self._held: tuple[str, QuantizedTensor] | None = None
        self._lending = inner if isinstance(inner, LendingSource) else None  # a slow check: once

    def metas(self) -> dict[str, TensorMeta]:
        return dict(self._metas)

    def get(self, name: str) -> torch.Tensor:
        meta = self._metas[name]
        return dequantize(self._quantized(name), meta.shape, self.scheme).to(meta.dtype)

    def alignment(self, name: str) -> int:
        """Ranges of ``name`` start at multiples of this (whole groups, whole bytes)."""
        return chunk_alignment(self.scheme, self._metas[name].shape)

    def get_range(
        self,
        name: str,
        lo: int,
        hi: int,
        buffers: WorkBuffers | None = None,
        signs: Callable[[torch.Tensor, int], object] | None = None,
    ) -> torch.Tensor:
        """Flat entries ``[lo, hi)`` of ``get(name)``, bit for bit, dequantized from those
        groups' codes only (in ``buffers`` when given, a view valid until their next use);
        ``signs(x, lo)`` flips them in place (applied to the integer codes)."""
        meta = self._metas[name]
        q = self._quantized(name)
        values = dequantize_range(q, meta.shape, self.scheme, lo, hi, buffers, signs)
        return values.to(meta.dtype)

    def quantized(self, name: str) -> QuantizedTensor:
        """The stored codes and scales of slot ``name`` (read-only by contract): what
        the fused retrieval kernel (randes.kernels) dequantizes itself."""
        return self._quantized(name)

    def _quantized(self, name: str) -> QuantizedTensor:
        """The codes and scales of ``name``, kept for the next ranges of the same slot
        (one slot's codes: an eighth of its float32 size at int4)."""
        if self._held is None or self._held[0] != name:
            self.release_held()
            codes, scales = self._read(codes_name(name)), self._read(scales_name(name))
            self._held = (name, QuantizedTensor(codes, scales))
        return self._held[1]

    def lent_drops(self, name: str) -> tuple[PageDrops | None, PageDrops | None]:
        """How compiled code drops the pages of slot ``name``'s codes and scales that
        `quantized` lent (randes.switch_program), each None where nothing is dropped."""
        if self._lending is None:
            return None, None
        return (
            self._lending.page_drops(codes_name(name)),
            self._lending.page_drops(scales_name(name)),
        )

    def release_held(self) -> None:
        """Give back the codes and scales of the slot read last (a pass over the slots
        is done: they would otherwise stay mapped until the next one)."""
        held, self._held = self._held, None
        if held is not None and self._lending is not None:
            self._lending.release(codes_name(held[0]))
            self._lending.release(scales_name(held[0]))

    def _read(self, name: str) -> torch.Tensor:
        """A lent tensor where the source lends them (read-only use only: dequantizing
        reads the codes, never writes them), else a read."""
        lent = self._lending.mapped(name) if self._lending is not None else None
        return lent if lent is not None else self._inner.get(name)

    def close(self) -> None:
        self._held = None  # before the mappings go: nothing lent outlives them
        self._inner.close()

    def __repr__(self) -> str:
        return f"QuantizedReader({self.scheme.name}, {self._inner!r})"


def _check_layout(
    inner: TensorSource, scheme: QuantScheme, slots: Mapping[str, TensorMeta]
) -> None:
    expected = {codes_name(s) for s in slots} | {scales_name(s) for s in slots}
    actual = set(inner.keys())
    if actual != expected:
        diff = sorted(expected ^ actual)
        raise IncompatibleCheckpointError(
            f"serving superposition ({scheme.name}) does not match the base layout "
            f"({len(diff)} names differ, e.g. {diff[0]!r})"
        )
    for slot in sorted(slots):
        n_codes, n_scales = scheme.layout(tuple(slots[slot].shape))
        for name, dtype, count in (
            (codes_name(slot), torch.uint8, n_codes),
            (scales_name(slot), torch.float32, n_scales),
        ):
            meta = inner.meta(name)
            if meta.dtype != dtype or meta.shape != (count,):
                raise IncompatibleCheckpointError(
                    f"serving tensor {name!r}: {meta.dtype}{list(meta.shape)} where "
                    f"{scheme.name} of {list(slots[slot].shape)} needs {dtype}[{count}]"
                )
