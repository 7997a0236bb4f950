"""The numba code of `randes.kernels` (imported on first use only: it imports numba).

Every scalar is kept float32 or a small integer on purpose (see randes.kernels): an
implicit float64 would round differently from the torch path.
"""

from __future__ import annotations

from typing import Any

import llvmlite.ir as ir
import numpy as np
from numba import carray, njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from randes import program_rows as fields

BLOCK = 4096
"""Entries decoded per inner step: their int8 codes stay in L1 between the passes."""

_OPTS: dict[str, Any] = {"nogil": True, "fastmath": False, "boundscheck": False}


def _cached(**extra: Any) -> Any:
    def wrap(fn: Any) -> Any:
        try:
            return njit(cache=True, **_OPTS, **extra)(fn)
        except RuntimeError:  # no writable cache location: compile in memory
            return njit(**_OPTS, **extra)(fn)

    return wrap


@intrinsic
def fma32(typingctx: Any, a: Any, b: Any, c: Any) -> Any:
    """float32 a * b + c with one rounding (llvm.fma: the instruction, or libm's fmaf)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        f32 = ir.FloatType()
        fnty = ir.FunctionType(f32, [f32, f32, f32])
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], fnty)
        return builder.call(fn, args)

    return sig, codegen


# Loops below index views from 0 (``x = a[lo:hi]; x[j]``): with offsets in the index
# (``a[lo + j]``) LLVM does not vectorize them, and they run 5-10x slower.


@_cached(inline="always")
def _decode(codes: Any, bits: int, q: Any, start: int, n: int) -> None:
    """q[:n] = the signed values of entries start..start+n of the range's packed codes
    (``start`` a multiple of 8: whole code bytes)."""
    if bits == 4:
        c = codes[start >> 1 : (start + n + 1) >> 1]
        for i in range(n >> 1):
            b = c[i]
            q[2 * i] = np.int8(b & 15) - np.int8(7)
            q[2 * i + 1] = np.int8(b >> 4) - np.int8(7)
        if n & 1:
            q[n - 1] = np.int8(c[n >> 1] & 15) - np.int8(7)
    elif bits == 8:
        c = codes[start : start + n]
        for i in range(n):
            q[i] = np.int8(c[i] - np.uint8(127))
    else:  # 3 bits: 8 codes in 3 little-endian bytes
        c = codes[(start >> 3) * 3 :]
        for u in range(n >> 3):
            t = 3 * u
            word = np.int32(c[t]) | (np.int32(c[t + 1]) << 8) | (np.int32(c[t + 2]) << 16)
            for k in range(8):
                q[8 * u + k] = np.int8((word >> (3 * k)) & 7) - np.int8(3)
        for i in range(n & ~7, n):  # the last, partial unit: only its own bytes exist
            bit = 3 * i
            t = bit >> 3
            word = np.int32(c[t])
            if t + 1 < c.shape[0]:
                word |= np.int32(c[t + 1]) << 8
            q[i] = np.int8((word >> (bit & 7)) & 7) - np.int8(3)


@_cached(inline="always")
def _flip_elementwise(q: Any, ebits: Any, start: int, n: int) -> None:
    """q[:n] *= the stream signs of entries start..start+n (``start`` a multiple of 8)."""
    e = ebits[start >> 3 :]
    for u in range(n >> 3):
        b = e[u]
        for k in range(8):
            bit = np.int8((b >> k) & 1)
            q[8 * u + k] = (q[8 * u + k] ^ -bit) + bit  # negated where the bit is set
    for i in range(n & ~7, n):
        bit = np.int8((e[i >> 3] >> (i & 7)) & 1)
        q[i] = (q[i] ^ -bit) + bit


@_cached(inline="always")
def _flip_sides(q: Any, cols: Any, rows: Any, width: int, pos: int, n: int) -> None:
    """q[:n] *= cols[i % width] * rows[i // width] for tensor entries i = pos..pos+n."""
    k = 0
    while k < n:
        r = (pos + k) // width
        c = (pos + k) - r * width
        m = min(n - k, width - c)
        qs = q[k : k + m]
        cs = cols[c : c + m]
        if rows.shape[0]:
            rs = rows[r]
            for u in range(m):
                qs[u] = qs[u] * cs[u] * rs
        else:
            for u in range(m):
                qs[u] = qs[u] * cs[u]
        k += m


@_cached(inline="always")
def _fma_groups(
    out: Any, base: Any, q: Any, scales: Any, group: int, alpha: Any, b0: int, k: int, m: int
) -> None:
    """out[b0 + j] = fma(float32(q[j]) * scale, alpha, base[b0 + j]) for j in k..m."""
    while k < m:
        g = (b0 + k) // group
        e = min(m, (g + 1) * group - b0)
        s = scales[g]
        o = out[b0 + k : b0 + e]
        t = base[b0 + k : b0 + e]
        qs = q[k:e]
        for j in range(e - k):
            o[j] = fma32(np.float32(qs[j]) * s, alpha, t[j])  # type: ignore[call-arg]
        k = e


@_cached(inline="always")
def _signed_units(
    out: Any, base: Any, q: Any, scales: Any, group: int, alpha: Any, ebits: Any, b0: int, m: int
) -> int:
    """The elementwise-signed `_fma_groups` over the whole 64-entry units of q[:m]
    (``group`` a multiple of 64), the sign applied in the same pass: each unit's 64 bits
    are read as one word and every lane negates its int32 value where its bit is set
    (the same exact value as the int8 negation, so the same bits). Returns the entries
    done."""
    e = ebits[b0 >> 3 :]
    units = m >> 6
    for u in range(units):
        w = np.uint64(0)
        for k in range(8):
            w |= np.uint64(e[8 * u + k]) << np.uint64(8 * k)
        s = scales[(b0 + 64 * u) // group]
        o = out[b0 + 64 * u : b0 + 64 * u + 64]
        t = base[b0 + 64 * u : b0 + 64 * u + 64]
        qs = q[64 * u : 64 * u + 64]
        for j in range(64):
            neg = -np.int32((w >> np.uint64(j)) & np.uint64(1))
            value = (np.int32(qs[j]) ^ neg) - neg
            o[j] = fma32(np.float32(value) * s, alpha, t[j])  # type: ignore[call-arg]
    return units << 6


@_cached()
def dequant_add(
    out: Any,
    base: Any,
    codes: Any,
    bits: int,
    scales: Any,
    group: int,
    alpha: Any,
    mode: int,
    ebits: Any,
    cols: Any,
    rows: Any,
    width: int,
    lo: int,
) -> None:
    """See randes.kernels.dequant_add_ (mode 3: elementwise signs, ``group`` a multiple
    of 64, applied in the add's pass)."""
    n = out.shape[0]
    q = np.empty(BLOCK, dtype=np.int8)
    for b0 in range(0, n, BLOCK):
        m = min(BLOCK, n - b0)
        _decode(codes, bits, q, b0, m)
        k = 0
        if mode == 3:
            k = _signed_units(out, base, q, scales, group, alpha, ebits, b0, m)
            if k < m:  # the tensor's last, partial unit
                _flip_elementwise(q[k:], ebits, b0 + k, m - k)
        elif mode == 1:
            _flip_elementwise(q, ebits, b0, m)
        elif mode == 2:
            _flip_sides(q, cols, rows, width, lo + b0, m)
        _fma_groups(out, base, q, scales, group, alpha, b0, k, m)


@_cached(inline="always")
def _chunk(
    out: Any,
    base: Any,
    codes: Any,
    bits: int,
    scales: Any,
    group: int,
    alpha: Any,
    mode: int,
    ebits: Any,
    cols: Any,
    rows: Any,
    width: int,
    lo: int,
    c0: int,
    c1: int,
) -> None:
    """`dequant_add` over entries ``[c0, c1)`` of a range starting at tensor entry
    ``lo`` (``c0`` aligned: whole groups, code and sign bytes)."""
    dequant_add(
        out[c0:c1],
        base[c0:c1],
        codes[(c0 * bits) >> 3 :],
        bits,
        scales[c0 // group :],
        group,
        alpha,
        mode,
        ebits[c0 >> 3 :] if ebits.shape[0] else ebits,
        cols,
        rows,
        width,
        lo + c0,
    )


@intrinsic
def _madvise(typingctx: Any, address: Any, length: Any, advice: Any) -> Any:
    """libc's madvise(address, length, advice), called from compiled code (the symbol is
    resolved in the process, as numba resolves libm's)."""
    sig = types.int32(types.uintp, types.uintp, types.int32)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        void_p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.IntType(32), [void_p, ir.IntType(64), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "madvise")
        return builder.call(fn, [builder.inttoptr(args[0], void_p), args[1], args[2]])

    return sig, codegen


@_cached()
def dequant_add_lent(
    out: Any,
    base: Any,
    codes: Any,
    bits: int,
    scales: Any,
    group: int,
    alpha: Any,
    mode: int,
    ebits: Any,
    cols: Any,
    rows: Any,
    width: int,
    lo: int,
    step: int,
    drop_every: int,
    margin: int,
    span: int,
    map_lo: int,
    map_hi: int,
    advice: int,
) -> int:
    """`dequant_add` over a whole range, ``step`` entries at a time, its base lent from
    a mapping ``[map_lo, map_hi)`` whose pages it drops as it goes (see
    randes.kernels.dequant_add_lent_); returns the entry from which they are kept."""
    n = out.shape[0]
    address = base.ctypes.data
    kept = 0
    for c0 in range(0, n, step):
        c1 = min(c0 + step, n)
        _chunk(
            out, base, codes, bits, scales, group, alpha, mode, ebits, cols, rows, width, lo, c0, c1
        )
        if drop_every and c1 - kept >= drop_every:
            first = max(map_lo, address + 4 * kept - margin)
            first -= first % span
            last = min(map_hi, address + 4 * c1)
            last -= last % span
            first = max(first, map_lo)
            if last > first:
                _madvise(first, last - first, advice)  # type: ignore[call-arg]
            kept = c1
    return kept


def _pointer(dtype: Any) -> Any:
    """An intrinsic that reads an int64 address as a pointer to ``dtype`` (for `carray`):
    a compiled program addresses every tensor it computes by number, so one call covers
    them all with no Python object per tensor."""

    @intrinsic
    def as_pointer(typingctx: Any, address: Any) -> Any:
        sig = types.CPointer(dtype)(types.int64)

        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(dtype)))

        return sig, codegen

    return as_pointer


_f32_at = _pointer(types.float32)
_u8_at = _pointer(types.uint8)
_i8_at = _pointer(types.int8)


@_cached(inline="always")
def drop_bounds(first: int, last: int, low: int, high: int, span: int) -> tuple[int, int]:
    """The whole spans of ``[first, last)`` within the mapping ``[low, high)`` (``low``
    page-aligned): the last partial span is kept (the next range in the file usually
    starts in it), and never a byte outside the mapping is included: below it lies
    other memory of the process, which ``MADV_DONTNEED`` would zero. Empty: lo >= hi."""
    first -= first % span
    first = max(first, low)
    last = min(last, high)
    last -= last % span
    return first, last


@_cached(inline="always")
def _drop(first: int, last: int, low: int, high: int, span: int, advice: int) -> None:
    """madvise the `drop_bounds` of ``[first, last)``."""
    lo, hi = drop_bounds(first, last, low, high, span)
    if hi > lo:
        _madvise(lo, hi - lo, advice)  # type: ignore[call-arg]


@_cached()
def run_program(
    rows: Any, alphas: Any, drop_every: int, margin: int, span: int, advice: int
) -> None:
    """Every range of ``rows`` (randes.switch_program.SwitchProgram) by `dequant_add`,
    ``STEP`` entries at a time, in order: one call, no GIL, no Python between tensors.
    Every ``drop_every`` entries the whole spans each lent input (base, codes, scales,
    sign stream) has passed are dropped from the process, so a large tensor never holds
    more than a few spans of any of them (the last partial span is left for the next
    drop, or the next range in the file)."""
    none_i8 = np.empty(0, dtype=np.int8)
    for r in range(rows.shape[0]):
        row = rows[r]
        n, bits, group, step = row[fields.N], row[fields.BITS], row[fields.GROUP], row[fields.STEP]
        out = carray(_f32_at(row[fields.OUT]), (n,))
        base = carray(_f32_at(row[fields.BASE]), (n,))
        codes = carray(_u8_at(row[fields.CODES]), ((n * bits + 7) >> 3,))
        scales = carray(_f32_at(row[fields.SCALES]), (row[fields.N_SCALES],))
        ebits = carray(_u8_at(row[fields.EBITS]), (((n + 7) >> 3) if row[fields.EBITS] else 0,))
        cols = (
            carray(_i8_at(row[fields.COLS]), (row[fields.WIDTH],)) if row[fields.COLS] else none_i8
        )
        signs_rows = (
            carray(_i8_at(row[fields.ROWS]), (row[fields.N_ROWS],)) if row[fields.ROWS] else none_i8
        )
        mode, width, lo = row[fields.MODE], row[fields.WIDTH], row[fields.LO]
        kept = 0
        for c0 in range(0, n, step):
            c1 = min(c0 + step, n)
            _chunk(
                out,
                base,
                codes,
                bits,
                scales,
                group,
                alphas[r],
                mode,
                ebits,
                cols,
                signs_rows,
                width,
                lo,
                c0,
                c1,
            )
            if c1 - kept < drop_every and c1 < n:
                continue
            if row[fields.BASE_HIGH]:
                first, last = row[fields.BASE] + 4 * kept, row[fields.BASE] + 4 * c1
                _drop(
                    first - margin, last, row[fields.BASE_LOW], row[fields.BASE_HIGH], span, advice
                )
            for d in range(fields.DROPS, fields.ROW_FIELDS, fields.DROP_FIELDS):
                if row[d + 3]:  # the bytes of [kept, c1) of this input, pro rata
                    first = row[d] + row[d + 1] * kept // n
                    last = row[d] + row[d + 1] * c1 // n
                    _drop(first - margin, last, row[d + 2], row[d + 3], span, advice)
            kept = c1


@_cached()
def drop_ranges(lows: Any, highs: Any, advice: int) -> None:
    """madvise ``[lows[i], highs[i])`` (starts rounded down to a page)."""
    for i in range(lows.shape[0]):
        first = lows[i] - lows[i] % 4096
        if highs[i] > first:
            _madvise(first, highs[i] - first, advice)  # type: ignore[call-arg]
