"""Reusable scratch tensors for chunked retrieval: no fresh pages per tensor computed.

Retrieval computes a tensor a bounded chunk of elements at a time (randes.retrieve);
every chunk needs the same few work tensors (unpacked codes, signs, their indices).
Allocating them per chunk or per tensor costs a page fault per 4 KiB touched, which
for a whole model is as many faults as the model has pages; a `WorkBuffers` keeps one
flat tensor per (role, dtype, device), grown to the largest size asked and handed out
as views. ``take`` is not thread-safe: one per thread (a runtime or one materialize
owns one). `ByteBuffers` is the thread-safe kind, for memory one thread fills and
another uses (the sign streams a helper thread draws ahead).
"""

from __future__ import annotations

import threading

import numpy as np
import torch


class WorkBuffers:
    """Named scratch tensors, each reused for every chunk (see the module docstring)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
        self.streams = ByteBuffers()
        """Sign streams drawn ahead by a helper thread (randes.retrieve)."""

    def take(self, role: str, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A 1-D ``dtype`` tensor of ``n`` elements on ``device``, contents undefined.

        The same memory is handed out again on the next ``take`` of ``role``: a caller
        holds a view only until it asks for the same role again.
        """
        key = (role, dtype, torch.device(device))
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values()) + self.streams.nbytes


class ByteBuffers:
    """Byte buffers lent to several holders at once, from any thread, and given back.

    A serving runtime's helper thread draws each tensor's packed sign stream (up to a
    few MiB) while the tensors before it are computed; a fresh array per tensor costs
    its pages' faults every task switch (measured: ~2,500 per switch of a 124M model,
    once nothing else keeps glibc's heap large). Buffers given back are lent again,
    best fit first; the pool never holds more than the most lent at once.
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def borrow(self, n: int) -> np.ndarray:
        """A uint8 array of at least ``n`` bytes (contents undefined), the caller's until
        it calls `give_back` with it."""
        with self._lock:
            fits = [i for i, buf in enumerate(self._free) if buf.shape[0] >= n]
            if fits:
                best = min(fits, key=lambda i: self._free[i].shape[0])
                return self._free.pop(best)
        return np.empty(max(n, 1 << 12), dtype=np.uint8)

    def give_back(self, buffer: np.ndarray) -> None:
        with self._lock:
            self._free.append(buffer)

    @property
    def nbytes(self) -> int:
        """Bytes held for lending (those lent out not counted)."""
        with self._lock:
            return sum(buf.shape[0] for buf in self._free)

    def clear(self) -> None:
        """Free what is held for lending (those lent out come back as usual)."""
        with self._lock:
            self._free.clear()
