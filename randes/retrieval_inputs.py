"""What retrieval (randes.retrieve) takes besides plain tensor sources: the ways a
source may compute, lend or read parts of a tensor, and a store of drawn signs. Each
is optional; retrieval checks for it once per plan and takes the plain path without.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from randes.buffers import WorkBuffers
from randes.source import TensorSource


@runtime_checkable
class RangeSource(TensorSource, Protocol):
    """A source that computes an aligned range of a tensor's flat entries on its own
    (`randes.serving.QuantizedReader`): retrieval then never holds a whole slot."""

    def alignment(self, name: str) -> int:
        """Flat offsets a range of ``name`` may start at are multiples of this."""
        ...

    def get_range(
        self,
        name: str,
        lo: int,
        hi: int,
        buffers: WorkBuffers | None = None,
        signs: Callable[[torch.Tensor, int], object] | None = None,
    ) -> torch.Tensor:
        """Flat entries ``[lo, hi)`` of ``get(name)``, possibly a view of ``buffers``,
        flipped by ``signs(x, lo)`` (in place, at whatever stage is cheapest) if given."""
        ...


@runtime_checkable
class RangeReader(Protocol):
    """A base source that reads part of a tensor into given memory (a file reader's
    positional read, a resident tensor's slice): fused retrieval then writes each
    output tensor once instead of copying the whole base tensor first."""

    def read_range_into(self, name: str, lo: int, out: torch.Tensor) -> bool:
        """Flat entries ``[lo, lo + out.numel())`` into ``out``; False: not possible here."""
        ...


@runtime_checkable
class MappedReader(Protocol):
    """A base source that lends part of a float32 tensor in place (a mapping of its
    file, a resident tensor): the fused kernel then reads the base without a copy."""

    def map_range(self, name: str, lo: int, hi: int) -> Any:
        """Flat entries ``[lo, hi)`` as a read-only float32 numpy array, or None."""
        ...

    def unmap_range(self, name: str, lo: int, hi: int, done: bool = False) -> None:
        """Done with the range `map_range` lent (drop its pages from the process);
        ``done``: the caller has finished with everything it mapped up to ``hi``."""
        ...

    def page_drops(self, name: str) -> PageDrops | None:
        """How the kernel may drop the pages of ranges of ``name`` lent by `map_range`
        while it computes them; None: nothing to drop (a resident tensor)."""
        ...


class PageDrops(NamedTuple):
    """The pages of a mapping that compiled code may drop as it passes them: whole,
    aligned ``span``s of bytes within ``[low, high)``, from the entry it started at less
    ``margin`` (what faults map ahead), by ``madvise(..., advice)``. The kernel drops
    what ``unmap_range(lo, hi, False)`` would (storage.file_maps.FileMaps.drop) without
    coming back to Python for it."""

    low: int
    high: int
    span: int
    margin: int
    advice: int


class KeptSigns(Protocol):
    """One task's drawn elementwise sign streams, by tensor name: where a serving
    runtime keeps them.

    The default map flips every entry of a tensor by a bit of a SHAKE-256 stream keyed by
    the task's seed and the tensor's name: one bit per parameter, drawn at about
    450 MB/s on one core. A task switch of a 124M model draws 15.5 MB of it, and on two
    cores that draw competes with the kernel that uses it: measured, a switch with the
    streams at hand took 0.10 s against 0.15 s drawing them (docs/benchmarks.md
    "Runtime"). The streams depend on nothing but the seed and the name, so a runtime
    may draw each once and read it back afterwards (storage.sign_files keeps them in a
    scratch file, in the page cache, not the process). Retrieval asks a `KeptSigns`
    first and draws only what it lacks; the result is the same bits either way.
    """

    def read_into(self, name: str, out: np.ndarray) -> bool:
        """Fill ``out`` (uint8, the stream's exact size) with the kept stream of
        ``name``; False when it is not kept (draw it, then `keep` it)."""
        ...

    def keep(self, name: str, stream: np.ndarray) -> None:
        """Keep the stream just drawn for ``name`` (or not, when over budget)."""
        ...

    def holds(self, name: str, nbytes: int) -> bool:
        """Whether the stream of ``name`` (``nbytes`` long) is kept."""
        ...

    def stream_address(self, name: str, nbytes: int) -> tuple[int, PageDrops] | None:
        """The address of the kept stream of ``name`` (``nbytes`` long) in a read-only
        mapping that lives as long as this store, and how its pages are dropped; None
        when it is not kept (randes.switch_program reads it there, no copy)."""
        ...
