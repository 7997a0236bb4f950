"""Tensors of verified local checkpoint files read in place, through a mapping.

A serving runtime reads the base and the quantized codes of every tensor once per task
switch. Copying them out of the page cache (``pread``) costs a pass over memory and an
allocation the process then holds; a mapping hands the page-cache pages to the kernel
that reads them, and dropping the pages after use (``MADV_DONTNEED``: they stay in the
page cache) keeps them out of the process's RSS. What a mapped read costs depends on
the page-cache folios under it: over 2 MiB folios one fault maps 2 MiB (a PMD), over
4 KiB ones it maps 64 KiB (Linux's fault-around), 32 times the faults and 512 times the
page-table entries to set up and tear down, for a 124M model about 8,000 faults and
0.08 s of system time per switch against 1,000 and 0.02 s (measured, see
docs/benchmarks.md "Runtime"). So every mapping is advised ``MADV_HUGEPAGE`` (pages
read in again after reclaim come in PMD-sized folios), and pages are dropped only in
whole, aligned 2 MiB spans, which never splits a PMD mapping into small ones.

Files that already sit in the page cache in small folios (copied with ``cp``, or read
back after the kernel reclaimed them, by something else than such a mapping) stay that
way as long as they are cached. A runtime therefore re-caches each file once when it
opens (`FileMaps.recache`): it counts the faults of touching the file through its
mapping, and where they show small folios it drops the file's cached pages
(``POSIX_FADV_DONTNEED``: clean pages only, and none another process maps) and reads
them back through the mapping, which brings them in as 2 MiB folios.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import resource
import threading
from pathlib import Path

import numpy as np
import torch

from randes.checkpoint import CheckpointReader
from randes.retrieval_inputs import PageDrops

_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None)
_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_RUSAGE_THREAD: int = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
FAULT_AROUND = 64 * 1024
"""Linux's default fault_around_bytes: what one fault over small folios maps."""
SPAN = 2 << 20
"""Pages are dropped in aligned spans of this size (a PMD on x86-64 and arm64)."""
SMALL_FOLIO_FAULTS = 1.0
"""Faults per MiB, touching a file every `FAULT_AROUND` bytes, above which its cached
pages are taken to be smaller folios than they could be (16 per MiB when all are 4 KiB,
0.5 when all are 2 MiB)."""
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _large_folios() -> bool:
    """Whether ``MADV_HUGEPAGE`` can bring a file in as 2 MiB folios here: Linux with
    transparent huge pages on (``always`` or ``madvise``)."""
    try:
        setting = _THP_SETTING.read_text(encoding="ascii")
    except OSError:
        return False
    return "[never]" not in setting


LEND_MIN = 256 << 10
"""Tensors of fewer bytes are read once and lent from the process's memory, not from
the mapping: one fault maps a whole 2 MiB span, which a small tensor would hold in the
RSS for a few KiB, and its drop would have the tensors beside it fault it back (norms,
biases and most slots' scales: 6 MB for a 124M GPT-2 and its int4 serving copy)."""
PENDING_SPANS = 2
"""Spans `FileMaps.drop` may defer before it drops them all: 4 MiB of a process's RSS at
most (small tensors are not lent at all, `LEND_MIN`: what is deferred is the last span of
a large tensor, where the next one in the file starts)."""
RECACHE_MIN = 2 * SPAN
TOUCH_STEP = 16 * SPAN
"""Bytes `FileMaps.recache` touches before it drops them."""
"""Files smaller than this are not worth a re-read."""

_NUMPY = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.uint8: np.uint8,
    torch.int8: np.int8,
}


def advise_huge(mapped: mmap.mmap) -> None:
    """Advise ``mapped`` ``MADV_HUGEPAGE``: pages read in through it come in PMD-sized
    folios (without transparent huge pages in this kernel: small ones, still correct)."""
    if _HUGEPAGE is not None:
        with contextlib.suppress(OSError):
            mapped.madvise(_HUGEPAGE)


def mapping_address(mapped: mmap.mmap) -> int:
    """The start address of ``mapped`` (read through a one-entry view that is dropped at
    once: a mapping with a live export cannot be closed)."""
    return int(np.frombuffer(mapped, dtype=np.uint8, count=1).ctypes.data)


class FileMaps:
    """One read-only view per file, made on first use and shared by every thread.

    The mappings are private (``MAP_PRIVATE``): what they lend is writable memory, so
    torch and numpy wrap it without a copy or a read-only warning, and a write by
    mistake would change the process's copy, never the verified file.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, tuple[mmap.mmap, int]] = {}
        self._pending: dict[Path, set[int]] = {}
        self._lock = threading.Lock()

    def view(self, path: Path, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """The mapping of ``path`` and its start address, or None when the file no
        longer holds ``[offset, offset + nbytes)`` (it shrank since its header was read:
        a positional read will say so) or mappings cannot drop pages here."""
        if _DONTNEED is None:
            return None
        with self._lock:  # two threads may ask for the first range of a file at once
            entry = self._maps.get(path)
            if entry is None:
                with open(path, "rb") as fh:
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
                advise_huge(mapped)
                address = mapping_address(mapped)
                entry = self._maps[path] = (mapped, address)
        if offset + nbytes > len(entry[0]):
            return None
        return entry

    def drop(self, path: Path, start: int, end: int, *, whole: bool) -> None:
        """Drop the pages mapped for bytes ``[start, end)`` of ``path`` from the process.

        The span grows back by one fault-around to the pages the faults before it
        mapped, and is cut to whole aligned `SPAN`s; the last span, which holds ``end``,
        stays mapped: with ``whole=False`` (more of the same range follows) the next
        range's drop takes it; with ``whole=True`` (the range is done) it is deferred
        (`flush`): the next tensor in the file mostly starts in it, and dropping it now
        would have that tensor fault it back (a small tensor's range is within one span).
        """
        entry = self._maps.get(path)
        if entry is None or _DONTNEED is None:
            return
        mapped, address = entry
        lo = address + max(0, start - FAULT_AROUND)
        hi = address + min(len(mapped), end + (FAULT_AROUND if whole else 0))
        lo -= lo % SPAN
        last = hi - hi % SPAN
        self._drop_spans(mapped, address, lo, last)
        if whole and last < hi:
            self._defer(path, last)

    def _drop_spans(self, mapped: mmap.mmap, address: int, lo: int, hi: int) -> None:
        lo, hi = max(lo, address), min(hi, address + len(mapped))
        if hi > lo and _DONTNEED is not None:
            first = lo - address
            first -= first % mmap.PAGESIZE  # madvise takes a page-aligned start
            mapped.madvise(_DONTNEED, first, hi - address - first)

    def _defer(self, path: Path, span: int) -> None:
        with self._lock:
            self._pending.setdefault(path, set()).add(span)
            over = sum(map(len, self._pending.values())) > PENDING_SPANS
        if over:
            self.flush()

    def flush(self) -> None:
        """Drop the spans `drop` deferred (at most `PENDING_SPANS` are ever kept)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for path, spans in pending.items():
            entry = self._maps.get(path)
            if entry is not None:
                for span in sorted(spans):
                    self._drop_spans(entry[0], entry[1], span, span + SPAN)

    def recache(self, path: Path) -> bool:
        """Bring ``path``'s cached pages into large folios when they are small ones (see
        the module's docstring). Returns whether it re-read the file. A no-op where the
        mapping is not advised ``MADV_HUGEPAGE`` (no re-read could help) or for files
        under `RECACHE_MIN`."""
        entry = self.view(path, 0, 0)
        if entry is None or _HUGEPAGE is None or not hasattr(os, "posix_fadvise"):
            return False
        if not _large_folios():
            return False
        size = len(entry[0])
        if size < RECACHE_MIN:
            return False
        faults = self._touch(path)
        if faults * (1 << 20) <= SMALL_FOLIO_FAULTS * size:
            return False
        with open(path, "rb") as fh:
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._touch(path)
        return True

    def _touch(self, path: Path) -> int:
        """Touch every `FAULT_AROUND` bytes of ``path``'s mapping, `TOUCH_STEP` bytes at
        a time, each dropped before the next (so the process never holds more); returns
        the faults it took (this thread's)."""
        mapped, _ = self._maps[path]
        faults = 0
        view = np.frombuffer(mapped, dtype=np.uint8)
        for start in range(0, len(mapped), TOUCH_STEP):
            before = resource.getrusage(_RUSAGE_THREAD)
            int(view[start : start + TOUCH_STEP : FAULT_AROUND].sum())
            after = resource.getrusage(_RUSAGE_THREAD)
            faults += after.ru_minflt - before.ru_minflt + after.ru_majflt - before.ru_majflt
            self.drop(path, start, start + TOUCH_STEP, whole=True)
        del view
        self.flush()
        return faults

    def close(self) -> None:
        self._pending = {}
        maps, self._maps = self._maps, {}
        for mapped, _ in maps.values():
            with contextlib.suppress(BufferError):  # a tensor still lent: freed with it
                mapped.close()


class MappedCheckpointReader(CheckpointReader):
    """A `CheckpointReader` whose tensors can also be read in place (`mapped`,
    `map_range`), for readers whose files were verified when they were opened."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(files)
        self._file_maps = FileMaps()
        self._held: dict[str, torch.Tensor] = {}
        """Tensors under `LEND_MIN`, read once and lent from memory afterwards."""

    def _small(self, name: str) -> torch.Tensor:
        held = self._held.get(name)
        if held is None:
            held = self._held[name] = super().get(name)
        return held

    @property
    def held_bytes(self) -> int:
        """Bytes of the small tensors held in the process (`LEND_MIN`)."""
        return sum(t.numel() * t.element_size() for t in self._held.values())

    def _span(self, name: str, lo: int, hi: int, itemsize: int) -> tuple[Path, int, int]:
        start = self._offset[name] + itemsize * lo
        return self._file_of[name], start, itemsize * (hi - lo)

    def _lends(self, name: str) -> bool:
        meta = self._metas.get(name)
        return meta is not None and meta.nbytes >= LEND_MIN

    def mapped(self, name: str) -> torch.Tensor | None:
        """``name`` as a CPU tensor over the mapped file, no copy (read-only by
        contract); `release` drops its pages. A tensor under `LEND_MIN` is lent from
        the process's memory instead (read once). None for dtypes it does not lend or
        an unaligned offset."""
        meta = self._metas.get(name)
        if meta is None or meta.dtype not in _NUMPY:
            return None
        if not self._lends(name):
            return self._small(name)
        path, start, nbytes = self._span(name, 0, meta.numel, meta.dtype.itemsize)
        aligned = start % meta.dtype.itemsize == 0
        entry = self._file_maps.view(path, start, nbytes) if aligned else None
        if entry is None or nbytes == 0:
            return None
        flat = torch.frombuffer(entry[0], dtype=meta.dtype, count=meta.numel, offset=start)
        return flat if len(meta.shape) == 1 else flat.view(meta.shape)

    def release(self, name: str) -> None:
        """Done with what `mapped` lent of ``name``: drop its pages from the process."""
        meta = self._metas.get(name)
        if meta is not None and self._lends(name):
            path, start, nbytes = self._span(name, 0, meta.numel, meta.dtype.itemsize)
            self._file_maps.drop(path, start, start + nbytes, whole=True)

    def map_range(self, name: str, lo: int, hi: int) -> np.ndarray | None:
        """Flat entries ``[lo, hi)`` of a float32 tensor over the mapping (from memory
        under `LEND_MIN`), no copy; None where that does not apply (another dtype, an
        unaligned offset)."""
        meta = self._metas.get(name)
        if meta is None or meta.dtype != torch.float32:
            return None
        if not self._lends(name):
            return self._small(name).view(-1)[lo:hi].numpy()
        path, start, nbytes = self._span(name, lo, hi, 4)
        entry = self._file_maps.view(path, start, nbytes) if start % 4 == 0 else None
        if entry is None:
            return None
        return np.frombuffer(entry[0], dtype=np.float32, count=hi - lo, offset=start)

    def page_drops(self, name: str) -> PageDrops | None:
        """How compiled code drops the pages of ``name``'s lent ranges as `unmap_range`
        does (`FileMaps.drop`): the bounds of its file's mapping, in whole `SPAN`s."""
        meta = self._metas.get(name)
        if meta is None or _DONTNEED is None or not self._lends(name):
            return None
        path, start, nbytes = self._span(name, 0, meta.numel, meta.dtype.itemsize)
        entry = self._file_maps.view(path, start, nbytes)
        if entry is None:
            return None
        mapped, address = entry
        return PageDrops(address, address + len(mapped), SPAN, FAULT_AROUND, _DONTNEED)

    def unmap_range(self, name: str, lo: int, hi: int, done: bool = False) -> None:
        """Done with entries ``[lo, hi)`` `map_range` lent: drop their pages; with
        ``done`` (or at the tensor's end) all of them, else the whole spans before the
        one in use, which the next range's drop takes (`FileMaps.drop`)."""
        meta = self._metas.get(name)
        if meta is None or not self._lends(name):
            return
        path, start, nbytes = self._span(name, lo, hi, 4)
        self._file_maps.drop(path, start, start + nbytes, whole=done or hi >= meta.numel)

    def flush_maps(self) -> None:
        """Drop the pages `release` and `unmap_range` left mapped for the next tensor
        (`FileMaps.drop`): at the end of a pass over the reader's tensors."""
        self._file_maps.flush()

    def recache(self) -> int:
        """`FileMaps.recache` each of the reader's files; returns how many it re-read."""
        return sum(self._file_maps.recache(path) for path in dict.fromkeys(self._file_of.values()))

    def close(self) -> None:
        self._held.clear()
        self._file_maps.close()
        super().close()
