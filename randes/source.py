"""What the core reads tensors through: `TensorSource`, names + headers + one tensor a time.

Fold, retrieval, capacity and scaling need no more of a checkpoint than its tensor
names, each tensor's dtype and shape without reading it (to plan every output before
computing anything), and one tensor on demand. That is the shape of mergekit's lazy
loader and of safetensors' ``safe_open`` (``keys``, ``get_slice(...).get_shape()``,
``get_tensor``), and the one contract every reader here keeps: the file-backed
`randes.checkpoint.CheckpointReader`, the dequantizing `randes.serving.QuantizedReader`,
a fine-tune under unwrapped names (`randes.keymap.Renamed`), a LoRA adapter read as
the merged model (`randes.adapters.LoraDense`), the runtime's resident readers.

``get`` hands out a tensor the caller owns and may modify in place (retrieval adds
into it): a source never returns memory it reads again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

import torch


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """What a header says about a tensor: enough to plan a fold without reading data."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_size(self.dtype)

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


_DTYPE_SIZES: dict[torch.dtype, int] = {}


def dtype_size(dtype: torch.dtype) -> int:
    size = _DTYPE_SIZES.get(dtype)
    if size is None:
        size = _DTYPE_SIZES[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


class TensorSource(Protocol):
    """Names, headers, one tensor at a time: all fold and retrieval read through."""

    def keys(self) -> list[str]:
        """Tensor names, sorted (a stable order for streaming)."""
        ...

    def meta(self, name: str) -> TensorMeta:
        """dtype and shape of ``name``, without reading its data."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """``name``'s tensor, fresh: the caller owns it."""
        ...

    def __contains__(self, name: object) -> bool: ...


class ClosableSource(TensorSource, Protocol):
    """A source holding resources (open files) until ``close``."""

    def close(self) -> None: ...


class Closing:
    """``with reader:`` for a source with a ``close``: closes it on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NamedView:
    """Keys, membership and length of a tensor source whose tensors are the keys of
    ``self.names`` (a renamed or a computed view of other sources): defined once here."""

    names: Mapping[str, object]

    def keys(self) -> list[str]:
        return sorted(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.names)


class MetaTable:
    """Keys, headers, membership and length of a tensor source that holds a table of
    its tensors' headers (``self._metas``, in key order): defined once here."""

    _metas: Mapping[str, TensorMeta]

    def keys(self) -> list[str]:
        return list(self._metas)

    def meta(self, name: str) -> TensorMeta:
        return self._metas[name]

    def __contains__(self, name: object) -> bool:
        return name in self._metas

    def __iter__(self) -> Iterator[str]:
        return iter(self._metas)

    def __len__(self) -> int:
        return len(self._metas)


def metas_of(source: TensorSource) -> dict[str, TensorMeta]:
    """Every tensor's header, in ``keys`` order."""
    return {name: source.meta(name) for name in source.keys()}  # noqa: SIM118
