"""Hashing overlapped with the I/O it checks: sha256 on a helper thread, reads and
writes on the caller's.

A fold hashes every byte it reads or writes (the source's pin, cached copies'
verification, the content address of every shard), and sha256 costs about as much
CPU as the read or write beside it. Done one after the other they add up; here the
digest of one chunk runs on a helper thread while the caller reads the next chunk
(or writes the same one), so the two overlap. ``hashlib`` releases the GIL for
buffers this size, and so do file reads and writes. The exception is a read on one
of `ahead`'s threads (a batch fold reads its members there, two at once): it hashes
each piece itself, so two such readers are two busy threads, not four.

Digests are still fed strictly in order, each by one thread at a time: every call
returns only once its hashing is done, so a digest, a buffer or a tensor handed in is
never touched again after the call returns. The helper threads belong to the process
that made them (a forked child makes its own).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from randes.threads import ProcessPool

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 8 << 20
"""Bytes per read and per hashing step (8 MB: large sequential reads, few syscalls)."""


_hashing = ProcessPool(2, "randes-hash")
"""The hashing threads."""


AHEAD_WORKERS = 2
"""Helper threads that compute `ahead` items at once (2: this machine's cores; reads,
sha256 and torch's kernels release the GIL, so two of them run side by side)."""

INLINE_CHUNK = 512 << 10
"""Bytes per read and hash on a read-ahead thread (`read_hashing` there hashes each piece
itself, just read and still in the core's cache: the read-ahead threads already run
side by side, and handing pieces to the hashing threads would only add threads
competing for the same cores)."""


def _hash_inline() -> None:
    _local.inline = True


_readers = ProcessPool(AHEAD_WORKERS, "randes-ahead", initializer=_hash_inline)
"""The read-ahead threads (their own pool: they may wait on the hashing threads)."""


def ahead(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    cost: Callable[[T], int] | None = None,
    budget: int = 0,
) -> Generator[R, None, None]:
    """``fn(item)`` for each item in order, the next ones computed on helper threads
    while the caller works on the current one (checkpoint tensors read, hashed and
    scrambled while the previous one is folded).

    Without ``cost`` one item is computed ahead. With it, items are started ahead while
    the ones started and not yet taken cost at most ``budget`` together (``cost(item)``:
    the bytes its result holds; one item is always started, whatever its cost), and up
    to `AHEAD_WORKERS` of them are computed at once: memory stays bounded by the budget
    plus the result the caller holds. Errors surface where their result is taken, in
    order; when the caller stops early, the items under way finish (the others are
    dropped) before this returns, so nothing reads a file the caller is about to close.
    ``fn`` must not wait on another `ahead` (the threads are shared)."""
    pool = _readers.get()
    source = iter(items)
    pending: collections.deque[tuple[Future[R], int]] = collections.deque()
    held = 0  # the cost of the items in pending
    upcoming: list[T] = []  # the next item, taken from items but not started yet

    def fill() -> None:
        nonlocal held
        while True:
            if not upcoming:
                try:
                    upcoming.append(next(source))
                except StopIteration:
                    return
            size = cost(upcoming[0]) if cost is not None else 0
            if pending and (cost is None or held + size > budget):
                return
            pending.append((pool.submit(fn, upcoming.pop()), size))
            held += size

    try:
        fill()
        while pending:
            future, size = pending.popleft()
            held -= size
            fill()  # the next ones start before the caller works on this one
            yield future.result()
    finally:
        for future, _ in pending:
            future.cancel()
        for future, _ in pending:
            with contextlib.suppress(BaseException):
                future.result()


def _update_all(digests: Sequence[Any], data: memoryview) -> list[Future[None]]:
    pool = _hashing.get()
    return [pool.submit(d.update, data) for d in digests]


def _wait(futures: list[Future[None]]) -> None:
    for future in futures:
        future.result()


def update_while(digests: Sequence[Any], data: memoryview, work: Callable[[], Any]) -> None:
    """``work()`` (e.g. writing ``data``) while ``data`` is fed to every digest."""
    futures = _update_all(digests, data)
    try:
        work()
    finally:
        _wait(futures)


def read_hashing(
    readinto: Callable[[memoryview], int], target: memoryview, digests: Sequence[Any]
) -> int:
    """Fill ``target`` with ``readinto`` calls, hashing each chunk read while the next
    one is read. Returns the bytes read (fewer than ``len(target)`` only at EOF)."""
    got = 0
    if getattr(_local, "inline", False):
        while got < len(target):  # a helper thread: hash each piece while it is in cache
            n = readinto(target[got : got + INLINE_CHUNK])
            if not n:
                break
            for digest in digests:
                digest.update(target[got : got + n])
            got += n
        return got
    pending: list[Future[None]] = []
    try:
        while got < len(target):
            n = readinto(target[got : got + CHUNK])
            if not n:
                break
            _wait(pending)
            pending = _update_all(digests, target[got : got + n])
            got += n
    finally:
        _wait(pending)
    return got


def stream_hashing(
    readinto: Callable[[memoryview], int],
    digests: Sequence[Any],
    *,
    limit: int | None = None,
    sink: Callable[[memoryview], Any] | None = None,
) -> int:
    """Read ``limit`` bytes (or up to EOF) through two alternating buffers: each chunk
    is hashed (and handed to ``sink``, e.g. a write) while the next one is read.
    Returns the bytes read."""
    buffers = _buffers()
    total = 0
    pending: list[Future[None]] = []
    which = 0
    try:
        while limit is None or total < limit:
            want = CHUNK if limit is None else min(CHUNK, limit - total)
            buffer = buffers[which][:want]
            n = readinto(buffer)
            if not n:
                break
            chunk = buffer[:n]
            _wait(pending)
            pending = _update_all(digests, chunk)
            if sink is not None:
                sink(chunk)
            total += n
            which ^= 1
    finally:
        _wait(pending)
    return total


_local = threading.local()


def _buffers() -> tuple[memoryview, memoryview]:
    """Two `CHUNK` buffers per thread, made once (no allocation, no page faults, per
    chunk)."""
    pair: tuple[memoryview, memoryview] | None = getattr(_local, "buffers", None)
    if pair is None:
        pair = (memoryview(bytearray(CHUNK)), memoryview(bytearray(CHUNK)))
        _local.buffers = pair
    return pair
