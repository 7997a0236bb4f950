"""Reusable scratch tensors for chunked retrieval: no fresh pages per tensor computed.

Retrieval computes a tensor a bounded chunk of elements at a time (randes.retrieve);
every chunk needs the same few work tensors (unpacked codes, signs, their indices).
Allocating them per chunk or per tensor costs a page fault per 4 KiB touched, which
for a whole model is as many faults as the model has pages; a `WorkBuffers` keeps one
flat tensor per (role, dtype, device), grown to the largest size asked and handed out
as views. Not thread-safe: one per thread (a runtime or one materialize owns one).
"""

from __future__ import annotations

import torch


class WorkBuffers:
    """Named scratch tensors, each reused for every chunk (see the module docstring)."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

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
        return sum(b.numel() * b.element_size() for b in self._bufs.values())
