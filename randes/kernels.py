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

import ctypes
import os
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from randes.program_rows import BASE, BITS, CODES, GROUP, N_SCALES, OUT, ROW_FIELDS, SCALES, STEP, N
from randes.retrieval_inputs import PageDrops

MODE_NONE = 0
"""No signs (the tensor is not flipped)."""
MODE_ELEMENTWISE = 1
"""One sign per entry: bit ``i`` of a packed stream (LSB first, set bit: -1)."""
MODE_ELEMENTWISE_UNITS = 3
"""MODE_ELEMENTWISE, its signs applied in the add's pass, 64 entries to a word (for
groups of a multiple of 64 entries: the quantized schemes' usual groups)."""
WORD_SIGNS = True
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


def warm() -> bool:
    """Compile (or load from the cache) the kernel now, and release the compiler's pages
    (`_release_compiler_pages`): a runtime does it when it opens, while its memory is
    small, so the compiler's transient memory never adds to the peak of a switch.
    False when the kernel is unavailable."""
    if not available():
        return False
    out = np.zeros(8, dtype=np.float32)
    codes, scales = np.zeros(4, dtype=np.uint8), np.ones(1, dtype=np.float32)
    dequant_add_(out, codes, 4, scales, 8, 1.0)
    dequant_add_(out, codes, 4, scales, 8, 1.0, step=8)
    row = np.zeros((1, ROW_FIELDS), dtype=np.int64)
    row[0, [OUT, N, BASE, CODES, SCALES, N_SCALES, GROUP, BITS, STEP]] = (
        out.ctypes.data,
        8,
        out.ctypes.data,
        codes.ctypes.data,
        scales.ctypes.data,
        1,
        8,
        4,
        8,
    )
    run_program_(row, np.ones(1, dtype=np.float32), 0, 0, 1, 0)
    drop_pages([], [], 0)
    return True


def _kernel() -> Any:
    if "kernel" not in _state:
        try:
            from randes.kernels_jit import dequant_add, dequant_add_lent

            _state["kernel"], _state["lent"] = dequant_add, dequant_add_lent
        except ImportError:  # numba missing or broken: retrieval keeps the torch path
            _state["kernel"] = _state["lent"] = None
    return _state["kernel"]


_MADV_PAGEOUT = 21
"""Linux 5.4+: reclaim these pages now (clean file pages are dropped, anonymous ones kept
where there is no swap): content is never lost, unlike MADV_DONTNEED on a private map."""


def _release_compiler_pages() -> int:
    """Hand LLVM's code pages back to the kernel once the kernel is compiled or loaded.

    numba maps libllvmlite (about 150 MB of code and tables) and its start-up touches
    about 90 MB of it, which then sit in the process's RSS although nothing runs them
    again until something new is compiled: more than a serving runtime's whole memory
    margin over ``from_pretrained``. Its read-only mappings are paged out (Linux
    ``madvise(MADV_PAGEOUT)``; a no-op elsewhere or on older kernels); a later compile
    faults back what it needs. Returns the bytes advised.
    """
    if not sys.platform.startswith("linux"):
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        advised = 0
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                parts = line.split()
                if len(parts) < 6 or "w" in parts[1] or "libllvmlite" not in parts[5]:
                    continue
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if madvise(lo, hi - lo, _MADV_PAGEOUT) == 0:
                    advised += hi - lo
        return advised
    except (OSError, AttributeError, ValueError):
        return 0


_EMPTY_U8 = np.empty(0, dtype=np.uint8)
_EMPTY_U8.flags.writeable = False
_EMPTY_I8 = np.empty(0, dtype=np.int8)


def _read_only(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only view: numba compiles one specialization per writability, so
    the inputs that come either way (a mapped base or the output itself, a sign
    stream or none) are always passed read-only: one compile, not four."""
    if not a.flags.writeable:
        return a
    view = a.view()
    view.flags.writeable = False
    return view


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
    base: np.ndarray | None = None,
    step: int = 0,
    drops: PageDrops | None = None,
) -> int:
    """``out[k] = fma(float32(q(k) * sign(lo + k)) * scales[k // group], alpha, base[k])``.

    ``base``: float32, the base entries ``[lo, lo + len(out))`` of the tensor (default:
    ``out`` itself, which then holds them on entry: computed in place); ``out``: float32;
    ``codes``: the packed codes from entry ``lo`` on (``lo * bits`` a multiple of 8);
    ``scales``: float32, from the group of entry ``lo`` (``lo`` a multiple of
    ``group``). Signs: ``ebits``, the packed elementwise stream from entry ``lo`` on
    (``lo`` a multiple of 8); or ``cols`` (and ``rows``), int8 +1/-1 over the whole
    tensor viewed (rows, ``width``), see MODE_SIDES; or none.

    ``step`` (a multiple of the range's alignment): the range is computed ``step``
    entries at a time, in one call that holds no GIL throughout; with ``drops`` (a base
    lent from a mapping) the whole spans of the base's pages it has passed are dropped
    every `UNMAP_ENTRIES` entries, as `randes.retrieval_inputs.MappedReader.unmap_range`
    would drop them. Returns the entry (from 0) from which the lent pages are still
    mapped: the caller's final drop starts there.
    """
    kernel, chunked = _kernel(), _state.get("lent")
    if kernel is None or chunked is None:
        raise RuntimeError("the fused kernel needs numba: check randes.kernels.available()")
    mode = MODE_NONE
    if ebits is not None:
        mode = MODE_ELEMENTWISE_UNITS if group % 64 == 0 and WORD_SIGNS else MODE_ELEMENTWISE
    elif cols is not None:
        mode = MODE_SIDES
    args = (
        out,
        _read_only(out if base is None else base),
        codes,
        bits,
        scales,
        group,
        np.float32(alpha),
        mode,
        _read_only(ebits) if ebits is not None else _EMPTY_U8,
        cols if cols is not None else _EMPTY_I8,
        rows if rows is not None else _EMPTY_I8,
        width,
        lo,
    )
    kept = 0
    if step:
        every = UNMAP_ENTRIES if drops is not None else 0
        d = drops if drops is not None else PageDrops(0, 0, 1, 0, 0)
        kept = chunked(*args, step, every, d.margin, d.span, d.low, d.high, d.advice)
    else:
        kernel(*args)
    if "released" not in _state:
        _state["released"] = _release_compiler_pages()
    return kept


def run_program_(
    rows: np.ndarray, alphas: np.ndarray, drop_every: int, margin: int, span: int, advice: int
) -> None:
    """Every row of a compiled switch (randes.switch_program) in one call, no GIL held:
    see randes.kernels_jit.run_program."""
    from randes.kernels_jit import run_program

    run_program(rows, alphas, drop_every, margin, span, advice)


def drop_pages(lows: list[int], highs: list[int], advice: int) -> None:
    """``madvise(advice)`` each address range ``[lows[i], highs[i])`` (pages of mappings
    a compiled switch read: see randes.switch_program)."""
    from randes.kernels_jit import drop_ranges

    drop_ranges(np.array(lows, dtype=np.int64), np.array(highs, dtype=np.int64), advice)


SPLIT_ENTRIES = 1 << 17
"""A tensor is split over two threads from twice this size on (smaller ones are not
worth the hand-over)."""

UNMAP_ENTRIES = 1 << 20
"""Entries (4 MiB of float32) a lent base range may span before its pages are dropped
from the process: at most a chunk (randes.retrieve.FUSED_CHUNK) per thread stays mapped."""


@dataclass
class FusedJob:
    """One tensor's fused retrieval, a chunk of ``step`` entries at a time.

    ``out``: the float32 output (flat); the base comes from ``map_range(lo, hi)`` (a
    read-only array lent in place, its pages dropped as the kernel passes them where
    ``drops`` says how, then ``unmap_range``), else ``read_range(lo, hi)`` fills
    ``out[lo:hi]`` with it a chunk at a time, else ``out`` already holds it.
    ``signs``: the keyword arguments of `dequant_add_` for the signs
    (SignMap.kernel_signs).
    """

    out: np.ndarray
    codes: np.ndarray
    bits: int
    scales: np.ndarray
    group: int
    alpha: float
    signs: dict[str, Any]
    step: int
    align: int
    """Ranges start at multiples of this (whole scale groups, code and sign bytes)."""
    map_range: Callable[[int, int], np.ndarray | None] | None = None
    unmap_range: Callable[[int, int, bool], None] | None = None
    """``(lo, hi, done)``: done with the lent entries ``[lo, hi)``; ``done``: with every
    entry of this job's range up to ``hi`` (a reader dropping pages in whole spans drops
    the last, partial one too)."""
    drops: PageDrops | None = None
    read_range: Callable[[int, int], None] | None = None

    def _kernel(self, lo: int, hi: int, base: np.ndarray | None, step: int) -> int:
        ebits = self.signs.get("ebits")
        return dequant_add_(
            self.out[lo:hi],
            self.codes[lo * self.bits // 8 :],
            self.bits,
            self.scales[lo // self.group :],
            self.group,
            self.alpha,
            lo=lo,
            ebits=ebits[lo // 8 :] if ebits is not None else None,
            cols=self.signs.get("cols"),
            rows=self.signs.get("rows"),
            width=int(self.signs.get("width", 1)),
            base=base,
            step=step,
            drops=self.drops if base is not None else None,
        )

    def run(self, lo0: int, hi0: int) -> None:
        """Entries ``[lo0, hi0)`` (``lo0`` a multiple of ``align``), in one call of the
        kernel where the base is lent or already in ``out`` (no GIL held meanwhile, so
        two threads run two halves side by side), else a read and a call per chunk."""
        src = self.map_range(lo0, hi0) if self.map_range is not None else None
        if src is not None:
            kept = self._kernel(lo0, hi0, src, self.step)
            del src
            if self.unmap_range is not None:  # done with [lo0, hi0): all of it
                self.unmap_range(lo0 + kept, hi0, True)
        elif self.read_range is None:
            self._kernel(lo0, hi0, None, self.step)
        else:
            for lo in range(lo0, hi0, self.step):
                hi = min(lo + self.step, hi0)
                self.read_range(lo, hi)
                self._kernel(lo, hi, None, 0)

    def run_all(
        self, helper: ThreadPoolExecutor | None = None, later: list[Future[None]] | None = None
    ) -> None:
        """The whole tensor; with a ``helper`` thread its second half runs there while
        this thread computes the first. With ``later``, the second half's future is
        appended to it instead of waited for (the caller waits before it uses the
        output: this thread goes on to the next tensor meanwhile)."""
        n = self.out.shape[0]
        if helper is None or n < 2 * SPLIT_ENTRIES:
            self.run(0, n)
            return
        mid = -(-n // (2 * self.align)) * self.align  # the middle, rounded to an aligned start
        second = helper.submit(self.run, mid, n)
        try:
            self.run(0, mid)
        except BaseException:
            wait([second])  # never leave the other half running behind a failure
            raise
        if later is None:
            second.result()
        else:
            later.append(second)
