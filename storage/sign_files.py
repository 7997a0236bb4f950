"""Drawn sign streams kept in one scratch file per task (randes.retrieval_inputs.KeptSigns).

A stream is appended once, at the first retrieval of its tensor (or a task's first
switch), and read back in place through a read-only mapping of the file by a compiled
switch (randes.switch_program: its pages dropped as the kernel passes them), or with a
positional read by the per-tensor path (``pread`` releases the GIL; 15.5 MB per switch
of a 124M model in a few milliseconds). The files are this
process's own scratch: made in a private temporary directory, indexed in memory, and
deleted when the runtime closes (or by the next runtime, when this one was killed:
storage.workdirs); nothing else reads them, so no digest is kept. A
budget caps the disk they take (one bit per parameter per task): past it, streams are
drawn each time, as without a store.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from pathlib import Path

import numpy as np

from randes.retrieval_inputs import PageDrops
from storage.file_maps import FAULT_AROUND, SPAN, advise_huge, mapping_address
from storage.workdirs import scratch_root, work_dir

DEFAULT_BUDGET = 2 << 30
"""Bytes of sign streams a runtime keeps at most (16 tasks of a 1B-parameter model)."""


class SignFiles:
    """The kept streams of every task a runtime serves, under one scratch directory."""

    def __init__(self, budget: int = DEFAULT_BUDGET, parent: Path | None = None) -> None:
        if budget < 0:
            raise ValueError(f"sign stream budget must be >= 0 bytes, got {budget}")
        self.budget = budget
        self.used = 0
        self._scratch = contextlib.ExitStack()
        root = parent if parent is not None else scratch_root()
        self._dir = self._scratch.enter_context(work_dir(root))  # sweeps killed runtimes'
        self._lock = threading.Lock()
        self._tasks: dict[int, TaskSignFile] = {}

    def task(self, number: int) -> TaskSignFile:
        """The store of task ``number`` (an index the runtime gives each task)."""
        with self._lock:
            store = self._tasks.get(number)
            if store is None:
                store = self._tasks[number] = TaskSignFile(self, self._dir / f"{number}.bits")
            return store

    def reserve(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget (and they are now counted)."""
        with self._lock:
            if self.used + nbytes > self.budget:
                return False
            self.used += nbytes
            return True

    def stop_keeping(self) -> None:
        """Keep nothing more (the scratch could not be written); kept streams stay."""
        with self._lock:
            self.budget = self.used

    def close(self) -> None:
        with self._lock:
            tasks, self._tasks = self._tasks, {}
        for store in tasks.values():
            store.close()
        self._scratch.close()


class TaskSignFile:
    """One task's kept streams: appended to one file, found by an in-memory index."""

    def __init__(self, owner: SignFiles, path: Path) -> None:
        self._owner = owner
        self._path = path
        self._fd: int | None = None
        self._index: dict[str, tuple[int, int]] = {}  # name -> (offset, bytes)
        self._pending: set[str] = set()  # being written
        self._end = 0
        self._lock = threading.Lock()
        self._maps: list[tuple[mmap.mmap, int]] = []
        """Read-only mappings of the file, the newest last: one is made again when the file
        has grown past it, and none is closed before the store (addresses in them are
        handed out)."""

    def holds(self, name: str, nbytes: int) -> bool:
        where = self._index.get(name)
        return where is not None and where[1] == nbytes and self._fd is not None

    def stream_address(self, name: str, nbytes: int) -> tuple[int, PageDrops] | None:
        advice = getattr(mmap, "MADV_DONTNEED", None)
        with self._lock:
            where = self._index.get(name)
            if where is None or where[1] != nbytes or self._fd is None or advice is None:
                return None
            offset = where[0]
            if not self._maps or len(self._maps[-1][0]) < offset + nbytes:
                try:
                    mapped = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
                except (OSError, ValueError):  # no address space left: read it back instead
                    return None
                advise_huge(mapped)
                self._maps.append((mapped, mapping_address(mapped)))
            mapped, address = self._maps[-1]
        drops = PageDrops(address, address + len(mapped), SPAN, FAULT_AROUND, advice)
        return address + offset, drops

    def read_into(self, name: str, out: np.ndarray) -> bool:
        where = self._index.get(name)
        if where is None or where[1] != out.nbytes or self._fd is None:
            return False
        got = os.preadv(self._fd, [out.data.cast("B")], where[0])
        if got != where[1]:  # the scratch file was cut by someone else: draw it again
            self._index.pop(name, None)
            return False
        return True

    def keep(self, name: str, stream: np.ndarray) -> None:
        nbytes = stream.nbytes
        with self._lock:  # two switches of this task at once keep a stream once
            if not nbytes or name in self._index or name in self._pending:
                return
            if not self._owner.reserve(nbytes):
                return
            if self._fd is None:
                self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fd, offset = self._fd, self._end
            self._end += nbytes
            self._pending.add(name)
        try:
            data = np.ascontiguousarray(stream).data.cast("B")
            written = 0
            while written < nbytes:
                written += os.pwrite(fd, data[written:], offset + written)
            with self._lock:
                self._index[name] = (offset, nbytes)  # found once every byte is written
        except OSError:  # scratch full or gone: keep drawing, the switch must not fail
            self._owner.stop_keeping()
        finally:
            with self._lock:
                self._pending.discard(name)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            self._index.clear()
            maps, self._maps = self._maps, []
        for mapped, _ in maps:
            mapped.close()
        if fd is not None:
            os.close(fd)
