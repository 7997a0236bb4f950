"""Helper threads a process makes once and keeps, not a pool per call.

Starting a thread pool's threads costs about a millisecond, which is a tenth of a task
switch's budget; the pools here are made on first use and reused by every later call.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_lock = threading.Lock()


class ProcessPool:
    """A thread pool of this process, made on first use and again in a forked child (a
    pool inherited through fork has no threads left)."""

    def __init__(
        self, workers: int, prefix: str, initializer: Callable[[], None] | None = None
    ) -> None:
        self._workers, self._prefix, self._initializer = workers, prefix, initializer
        self._made: tuple[int, ThreadPoolExecutor] | None = None

    def get(self) -> ThreadPoolExecutor:
        with _lock:
            if self._made is None or self._made[0] != os.getpid():
                pool = ThreadPoolExecutor(
                    self._workers, thread_name_prefix=self._prefix, initializer=self._initializer
                )
                self._made = (os.getpid(), pool)
            return self._made[1]
