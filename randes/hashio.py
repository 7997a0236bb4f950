"""Hashing overlapped with the I/O it checks: sha256 on a helper thread, reads and
writes on the caller's.

A fold hashes every byte it reads or writes (the source's pin, cached copies'
verification, the content address of every shard), and sha256 costs about as much
CPU as the read or write beside it. Done one after the other they add up; here the
digest of one chunk runs on a helper thread while the caller reads the next chunk
(or writes the same one), so the two overlap. ``hashlib`` releases the GIL for
buffers this size, and so do file reads and writes.

Digests are still fed strictly in order, each by one thread at a time: every call
returns only once its hashing is done, so a digest, a buffer or a tensor handed in is
never touched again after the call returns. The helper threads belong to the process
that made them (a forked child makes its own).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

CHUNK = 8 << 20
"""Bytes per read and per hashing step (8 MB: large sequential reads, few syscalls)."""

_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _executor() -> ThreadPoolExecutor:
    """This process's hashing threads (a pool inherited through fork has none left)."""
    global _pool
    with _lock:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(2, thread_name_prefix="randes-hash"))
        return _pool[1]


_ahead: tuple[int, ThreadPoolExecutor] | None = None


def _reader() -> ThreadPoolExecutor:
    """This process's read-ahead thread (its own: it waits on the hashing threads)."""
    global _ahead
    with _lock:
        if _ahead is None or _ahead[0] != os.getpid():
            _ahead = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="randes-ahead"))
        return _ahead[1]


def ahead(fn: Callable[[T], R], items: Iterable[T]) -> Generator[R, None, None]:
    """``fn(item)`` for each item in order, the next one computed on a helper thread
    while the caller works on the current one (a checkpoint tensor read and hashed
    while the previous one is folded). Errors surface where their result is taken; when
    the caller stops early, the read under way finishes before this returns, so nothing
    reads a file the caller is about to close."""
    pool = _reader()
    pending: Future[R] | None = None
    try:
        for item in items:
            previous, pending = pending, pool.submit(fn, item)
            if previous is not None:
                yield previous.result()
        if pending is not None:
            done, pending = pending, None
            yield done.result()
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                pending.result()


def _update_all(digests: Sequence[Any], data: memoryview) -> list[Future[None]]:
    pool = _executor()
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
