"""The fused retrieval kernel: dequantize, unflip, scale and add in one pass (numba).

Retrieval of one tensor from a quantized serving superposition is, per entry ``i``::

    q   = code(i) - qmax                  # int8, exact
    q   = q * sign(i)                     # int8, exact (the task's sign map)
    v   = float32(q) * scale[i // group]  # one float32 rounding
    out = fma(v, float32(lambda), base)   # torch's vectorized add_(v, alpha=lambda)

The eager torch path (randes.quantize.dequantize_range, randes.transforms.SignMap and
``Tensor.add_``) runs that as five or six passes over work buffers plus Python per
chunk; a task switch of a 124M model spent most of its time there. `dequant_add_`
runs it in one compiled pass over the packed codes, the group scales, the signs and
the base values, writing the result in place. It releases the GIL.

It is a second implementation of the same math, so it must give the same bits: every
scalar is float32 or a small integer (no float64 promotion), no fast-math
contraction, and the final add is an explicit fused multiply-add (``llvm.fma``, one
rounding), which is what torch's vectorized CPU ``add_`` with ``alpha`` computes
(``vec::fmadd``). tests/core/test_kernels.py checks it against the torch path bit for
bit for every map kind, bit width, target dtype and odd sizes; retrieval keeps the
torch path where the kernel does not apply (CUDA, the fp32 master, numba missing,
``RANDES_NO_KERNELS=1``).

numba is imported on first use, not with this module (the CLI starts fast). Compiled
code is cached on disk by numba (``cache=True``: next to randes/kernels_jit.py, or
numba's user-wide cache directory when the package directory is read-only, or
``NUMBA_CACHE_DIR``); with no writable location it compiles in memory. The first
compile in a fresh environment costs a few seconds, once.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

MODE_NONE = 0
"""No signs (the tensor is not flipped)."""
MODE_ELEMENTWISE = 1
"""One sign per entry: bit ``i`` of a packed stream (LSB first, set bit: -1)."""
MODE_SIDES = 2
"""Entry ``i`` of a tensor viewed (rows, width) gets ``cols[i % width] * rows[i // width]``
(``rows`` empty: column signs only; width = numel: one sign per entry, rank-0/1)."""

_state: dict[str, Any] = {}


def available() -> bool:
    """Whether the fused kernel runs here (numba importable), unless ``RANDES_NO_KERNELS``
    is set to something other than 0 (then retrieval runs the torch path)."""
    if os.environ.get("RANDES_NO_KERNELS", "") not in ("", "0"):
        return False
    return _kernel() is not None


def _kernel() -> Any:
    if "kernel" not in _state:
        try:
            from randes.kernels_jit import dequant_add

            _state["kernel"] = dequant_add
        except ImportError:  # numba missing or broken: retrieval keeps the torch path
            _state["kernel"] = None
    return _state["kernel"]


_EMPTY_U8 = np.empty(0, dtype=np.uint8)
_EMPTY_I8 = np.empty(0, dtype=np.int8)


def dequant_add_(
    out: np.ndarray,
    codes: np.ndarray,
    bits: int,
    scales: np.ndarray,
    group: int,
    alpha: float,
    *,
    lo: int = 0,
    ebits: np.ndarray | None = None,
    cols: np.ndarray | None = None,
    rows: np.ndarray | None = None,
    width: int = 1,
) -> None:
    """``out[k] = fma(float32(q(k) * sign(lo + k)) * scales[k // group], alpha, out[k])``.

    ``out``: float32, on entry the base entries ``[lo, lo + len(out))`` of the tensor;
    ``codes``: the packed codes from entry ``lo`` on (``lo * bits`` a multiple of 8);
    ``scales``: float32, from the group of entry ``lo`` (``lo`` a multiple of
    ``group``). Signs: ``ebits``, the packed elementwise stream from entry ``lo`` on
    (``lo`` a multiple of 8); or ``cols`` (and ``rows``), int8 +1/-1 over the whole
    tensor viewed (rows, ``width``), see MODE_SIDES; or none.
    """
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the fused kernel needs numba: check randes.kernels.available()")
    mode = MODE_NONE
    if ebits is not None:
        mode = MODE_ELEMENTWISE
    elif cols is not None:
        mode = MODE_SIDES
    kernel(
        out,
        codes,
        bits,
        scales,
        group,
        np.float32(alpha),
        mode,
        ebits if ebits is not None else _EMPTY_U8,
        cols if cols is not None else _EMPTY_I8,
        rows if rows is not None else _EMPTY_I8,
        width,
        lo,
    )
