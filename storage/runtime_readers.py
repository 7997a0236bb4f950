"""Readers a `BundleRuntime` serves from: tensors held in memory, or the base read from
its verified files; both can lend one read to the module being switched (`_Lending`).

Both are `randes.source.TensorSource`s (the resident one by composition: names, headers
and tensors of a dict; the file one a `CheckpointReader`), so the retrieval plan
materialize runs takes them where it takes a file reader, without a line of it changing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from randes.checkpoint import read_exact_into
from randes.retrieval_inputs import PageDrops
from randes.source import Closing, MetaTable, TensorMeta, TensorSource
from storage.file_maps import MappedCheckpointReader


class _Lending:
    """Lets a switch compute a tensor straight in the module's own storage.

    Inside ``lend(name, target)`` the next ``get(name)`` fills ``target`` with the base
    tensor and returns it instead of a fresh one: retrieval adds the task's delta into
    what ``get`` returned, so no copy of the base tensor is allocated and none is copied
    back. Only that one read of the tensor being computed is lent, so nothing else can
    alias the module.
    """

    _lent: tuple[str, torch.Tensor] | None = None

    def _fits(self, name: str, target: torch.Tensor) -> bool:
        raise NotImplementedError

    def _fill(self, name: str, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _take_lent(self, name: str) -> torch.Tensor | None:
        lent = self._lent
        if lent is None or lent[0] != name:
            return None
        self._lent = None  # lent once: any later read of the name gets a copy
        return self._fill(name, lent[1])

    @contextlib.contextmanager
    def lend(self, name: str, target: torch.Tensor | None) -> Iterator[None]:
        fits = target is not None and target.is_contiguous() and self._fits(name, target)
        self._lent = (name, target) if fits and target is not None else None
        try:
            yield
        finally:
            self._lent = None


class ResidentReader(MetaTable, _Lending, Closing):
    """A `randes.source.TensorSource` over tensors held in memory (on any device).

    ``get`` hands out a copy, as a file reader hands out a fresh tensor: retrieval
    adds into what it gets, and the resident tensors must never change.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], *, copies: bool = True) -> None:
        self._tensors = dict(sorted(tensors.items()))
        self._metas = {n: TensorMeta(t.dtype, tuple(t.shape)) for n, t in self._tensors.items()}
        self._copies = copies

    @classmethod
    def load(
        cls, reader: TensorSource, device: torch.device, *, copies: bool = True
    ) -> ResidentReader:
        """Read every tensor of ``reader`` onto ``device``, one at a time.

        ``copies=False`` hands out the resident tensors themselves: only for readers
        whose consumer never writes what it gets (the codes and scales a
        `QuantizedReader` dequantizes into a new tensor)."""
        tensors = {name: reader.get(name).to(device) for name in reader.keys()}  # noqa: SIM118
        return cls(tensors, copies=copies)

    def _fits(self, name: str, target: torch.Tensor) -> bool:
        mine = self._tensors.get(name)
        return (
            mine is not None
            and target.shape == mine.shape
            and target.dtype == mine.dtype
            and target.device == mine.device
        )

    def _fill(self, name: str, target: torch.Tensor) -> torch.Tensor:
        return target.copy_(self._tensors[name])

    def get(self, name: str) -> torch.Tensor:
        lent = self._take_lent(name)
        if lent is not None:
            return lent
        return self._tensors[name].clone() if self._copies else self._tensors[name]

    def read_range_into(self, name: str, lo: int, out: torch.Tensor) -> bool:
        """Flat entries ``[lo, lo + out.numel())`` of ``name`` copied into ``out`` (the
        per-chunk read of fused retrieval); False when ``out`` does not fit."""
        mine = self._tensors[name]
        if mine.device != out.device or mine.dtype != out.dtype or not mine.is_contiguous():
            return False
        out.copy_(mine.view(-1)[lo : lo + out.numel()])
        return True

    def map_range(self, name: str, lo: int, hi: int) -> np.ndarray | None:
        """Flat entries ``[lo, hi)`` of a resident CPU float32 tensor, as a read-only
        array over its memory (no copy); None for anything else."""
        mine = self._tensors[name]
        if mine.device.type != "cpu" or mine.dtype != torch.float32 or not mine.is_contiguous():
            return None
        return mine.view(-1)[lo:hi].numpy()

    def unmap_range(self, name: str, lo: int, hi: int, done: bool = False) -> None:
        """Nothing to release: the tensor is resident."""

    def page_drops(self, name: str) -> PageDrops | None:
        """Nothing to drop: the tensor is resident."""
        return None

    def view(self, name: str) -> torch.Tensor:
        """The resident tensor itself, read-only by contract (no copy)."""
        return self._tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def close(self) -> None:
        """Nothing to release: the runtime drops the tensors with the reader."""

    def __repr__(self) -> str:
        return f"ResidentReader({len(self)} tensors, {self.nbytes} bytes)"


class FileBaseReader(_Lending, MappedCheckpointReader):
    """The base read from its verified local files each time a tensor is computed.

    Its bytes then live in the page cache, not in the process: shared by every server
    on the machine, reclaimable, and outside the RSS of each. The fused kernel reads
    them in place through `map_range` (a mapping, pages dropped every few chunks,
    `storage.file_maps`); the torch path (CUDA, no numba) gets a lent read straight in
    the module's storage (``readinto``). The files were checked against their sha256
    when the runtime opened them; like any mapped file (``from_pretrained`` maps its
    own) a base truncated by someone else while a switch reads it would end the process
    with SIGBUS.
    """

    def __init__(self, files: list[Path], device: torch.device) -> None:
        super().__init__(files)
        self.device = device

    def _fits(self, name: str, target: torch.Tensor) -> bool:
        meta = self._metas.get(name)
        return (
            meta is not None
            and target.device.type == "cpu"
            and tuple(target.shape) == meta.shape
            and target.dtype == meta.dtype
        )

    def _fill(self, name: str, target: torch.Tensor) -> torch.Tensor:
        """``get`` into ``target``'s memory: one positional read of the validated range."""
        if self._metas[name].nbytes == 0:
            return target
        read_exact_into(self._handles, self._file_of[name], self._offset[name], target, name)
        return target

    def get(self, name: str) -> torch.Tensor:
        lent = self._take_lent(name)
        if lent is not None:
            return lent
        return super().get(name).to(self.device)

    def view(self, name: str) -> torch.Tensor:
        """A fresh copy: nothing of the base is resident."""
        return self.get(name)

    @property
    def nbytes(self) -> int:
        """Bytes of the base held by the process (its small tensors)."""
        return self.held_bytes
