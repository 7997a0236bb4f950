"""Symmetric absmax quantization of superposition slots, for serving artifacts.

Why it is safe here: a retrieved task already carries the cross-talk of every other
task as zero-mean noise, of the same order as its own delta; rounding the superposition
to a few bits adds a much smaller, independent noise on top. The fp32 master stays the
one that is folded into (exact removal, no re-quantization drift); a quantized copy is
derived from it once per version and is what `pull` / `materialize` serve by default.

Layout of one quantized tensor ``w`` of shape ``s`` (both standard safetensors tensors):

- ``w`` flattened row-major, cut into groups of ``group_size`` consecutive elements
  (per-row: ``group_size = numel // s[0]``, so every row is a group); the last group is
  zero-padded;
- ``<w>.q``: uint8 codes ``q + 2**(bits-1) - 1`` with ``q = round(x / scale)`` in
  ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]``, packed little-endian bit by bit:
  1 code per byte for int8, 2 for int4, 8 codes in 3 bytes for int3;
- ``<w>.scale``: one float32 scale (absmax / qmax) per group.

Everything needed to decode (bits, group size, original shape and dtype) is in the
manifest's `QuantScheme` and the base's header, never guessed from the data.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from randes.buffers import WorkBuffers

QuantBits = Literal[8, 4, 3]

CODES_SUFFIX = ".q"
SCALES_SUFFIX = ".scale"


class QuantScheme(BaseModel):
    """How a serving superposition is quantized: bits per value and the scale grouping.

    ``group_size=None`` means one scale per row (``numel // shape[0]`` values; a 1-D
    tensor is one row). A group of 64 costs 0.5 bit per value in float32 scales.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bits: QuantBits = 4
    group_size: int | None = Field(default=64, ge=8, le=1 << 20)

    @property
    def name(self) -> str:
        grouping = "row" if self.group_size is None else f"g{self.group_size}"
        return f"int{self.bits}-{grouping}"

    def group_of(self, shape: tuple[int, ...]) -> int:
        """Elements per scale for a tensor of ``shape``."""
        numel = math.prod(shape)
        if self.group_size is not None:
            return max(1, min(self.group_size, numel))
        if len(shape) >= 2 and shape[0]:
            return max(1, numel // shape[0])
        return max(1, numel)  # a scalar or 1-D tensor is one row

    def layout(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """(number of code bytes, number of scales) for a tensor of ``shape``."""
        numel = math.prod(shape)
        group = self.group_of(shape)
        groups = max(1, -(-numel // group))
        return _packed_bytes(groups * group, self.bits), groups

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Stored bytes (codes + float32 scales) of one tensor, headers excluded."""
        codes, scales = self.layout(shape)
        return codes + 4 * scales


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor  # uint8, 1-D
    scales: torch.Tensor  # float32, 1-D


def _qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def _packed_bytes(n_values: int, bits: int) -> int:
    return -(-n_values * bits // 8)


_CHUNK_VALUES = 1 << 18
"""Values quantized per step of `_quantize_chunked` (1 MB of float32 scratch: it stays in cache)."""


def quantize(x: torch.Tensor, scheme: QuantScheme) -> QuantizedTensor:
    """Quantize ``x`` (any float dtype, any shape) with ``scheme``; deterministic."""
    shape = tuple(x.shape)
    group = scheme.group_of(shape)
    numel = x.numel()
    if numel and not numel % group and (scheme.bits != 4 or not numel % 2):
        return _quantize_chunked(x, scheme, group)
    flat = x.detach().reshape(-1).to(torch.float32)
    pad = (-flat.numel()) % group
    if pad or flat.numel() == 0:
        flat = torch.cat([flat, flat.new_zeros(pad if flat.numel() else group)])
    rows = flat.view(-1, group)
    qmax = _qmax(scheme.bits)
    scales = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(rows / safe[:, None]).clamp_(-qmax, qmax).to(torch.int16) + qmax
    return QuantizedTensor(_pack(codes.reshape(-1).to(torch.uint8), scheme.bits), scales)


def _quantize_chunked(x: torch.Tensor, scheme: QuantScheme, group: int) -> QuantizedTensor:
    """`quantize` of a tensor that needs no padding, a block of groups at a time.

    The same operations on the same values as the whole-tensor form (identical codes
    and scales, bit for bit), but every intermediate lives in one small scratch buffer
    reused block after block: the whole-tensor form allocated five tensor-sized
    temporaries per slot (abs, quotient, int16 codes, uint8 codes, nibbles), about
    20 bytes per value of fresh memory, hence page faults, for a 0.5-byte result. A
    fold quantizes every slot of a 1 GB master, so that was a third of its math.
    """
    bits = scheme.bits
    qmax = _qmax(bits)
    rows = x.detach().reshape(-1, group)
    n_rows = rows.shape[0]
    step = max(8, _CHUNK_VALUES // group // 8 * 8)  # whole bytes of codes per block
    scales = torch.empty(n_rows, dtype=torch.float32)
    packed = torch.empty(_packed_bytes(rows.numel(), bits), dtype=torch.uint8)
    scratch = torch.empty(min(step, n_rows) * group, dtype=torch.float32)
    codes = torch.empty(scratch.numel(), dtype=torch.uint8)
    high = torch.empty(scratch.numel() // 2, dtype=torch.uint8) if bits == 4 else None
    done = 0  # bytes of ``packed`` filled
    for start in range(0, n_rows, step):
        block = rows[start : start + step]
        m = block.shape[0]
        work = scratch[: m * group].view(m, group)
        work.copy_(block)  # to float32, as the whole-tensor form's .to(torch.float32)
        block_scales = scales[start : start + m]
        torch.amax(work.abs_(), dim=1, out=block_scales)
        block_scales.div_(qmax)
        safe = torch.where(block_scales > 0, block_scales, torch.ones_like(block_scales))
        work.copy_(block)
        torch.div(work, safe[:, None], out=work)
        work.round_().clamp_(-qmax, qmax).add_(qmax)
        block_codes = codes[: m * group]
        block_codes.copy_(work.view(-1))
        if high is not None:
            pairs = block_codes.view(-1, 2)
            n = pairs.shape[0]
            torch.bitwise_left_shift(pairs[:, 1], 4, out=high[:n])
            torch.bitwise_or(pairs[:, 0], high[:n], out=packed[done : done + n])
        else:
            out = _pack(block_codes, bits)
            n = out.numel()
            packed[done : done + n].copy_(out)
        done += n
    return QuantizedTensor(packed, scales)


def dequantize(q: QuantizedTensor, shape: tuple[int, ...], scheme: QuantScheme) -> torch.Tensor:
    """The float32 tensor of ``shape`` that ``q`` encodes."""
    numel = math.prod(shape)
    n_values = q.scales.numel() * scheme.group_of(shape)
    if q.codes.dim() != 1 or q.codes.numel() != _packed_bytes(n_values, scheme.bits):
        _unpack(q.codes, scheme.bits, n_values)  # raises the dtype / size error
    return dequantize_range(q, shape, scheme, 0, numel).reshape(shape)


def chunk_alignment(scheme: QuantScheme, shape: tuple[int, ...]) -> int:
    """Flat offsets where a `dequantize_range` may start: whole scale groups and whole
    code bytes (8 values fill whole bytes at 8, 4 and 3 bits)."""
    return math.lcm(scheme.group_of(shape), 8)


def dequantize_range(
    q: QuantizedTensor,
    shape: tuple[int, ...],
    scheme: QuantScheme,
    lo: int,
    hi: int,
    buffers: WorkBuffers | None = None,
    signs: Callable[[torch.Tensor, int], object] | None = None,
) -> torch.Tensor:
    """Flat elements ``[lo, hi)`` of ``dequantize(q, shape, scheme)``, bit for bit: the
    same codes times the same group scales, computed for those groups only.

    ``lo`` must be a multiple of `chunk_alignment` (or 0). With ``buffers`` the result is
    a view of a reused work buffer (valid until the next call with the same buffers):
    what lets retrieval stream a tensor through bounded memory without fresh pages.
    ``signs(codes, lo)``, when given, flips the signed integer codes of the range in
    place (int8, before they are scaled): the result is then the flipped values, bit for
    bit (negating a factor negates a rounded product exactly), at a quarter of the
    memory traffic of flipping float32 values.
    """
    numel = math.prod(shape)
    group = scheme.group_of(shape)
    n_groups = q.scales.numel()
    if not 0 <= lo <= hi <= numel or lo % group or (lo * scheme.bits) % 8:
        raise ValueError(f"range [{lo}, {hi}) is not an aligned range of {numel} values")
    g0, g1 = lo // group, min(n_groups, -(-hi // group))
    n_values = max(0, g1 - g0) * group  # whole groups (the last one zero-padded)
    start = lo * scheme.bits // 8
    packed = q.codes[start : start + _packed_bytes(n_values, scheme.bits)]
    codes = _unpack_codes(packed, scheme.bits, n_values, buffers).view(torch.int8)
    codes.sub_(_qmax(scheme.bits))  # q in [-qmax, qmax]: exact in int8
    if signs is not None:
        signs(codes[: hi - lo], lo)
    out = (
        torch.empty(n_values, dtype=torch.float32, device=packed.device)
        if buffers is None
        else buffers.take("values", n_values, torch.float32, packed.device)
    )
    rows = out.copy_(codes).view(-1, group)
    rows.mul_(q.scales[g0:g1].to(torch.float32)[:, None])
    return out[: hi - lo]


def fake_quantize(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """quantize then dequantize: what a reader of the serving artifact gets back."""
    return dequantize(quantize(x, scheme), tuple(x.shape), scheme)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.contiguous()
    if bits == 4:
        if codes.numel() % 2:
            codes = torch.cat([codes, codes.new_zeros(1)])
        pairs = codes.view(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()
    if bits == 3:
        n_values = codes.numel()
        pad = (-n_values) % 8
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad)])
        eights = codes.view(-1, 8).to(torch.int32)
        word = torch.zeros(eights.shape[0], dtype=torch.int32)
        for i in range(8):
            word |= eights[:, i] << (3 * i)
        out = torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], dim=1)
        return out.to(torch.uint8).reshape(-1)[: _packed_bytes(n_values, 3)].contiguous()
    raise ValueError(f"unsupported bit width {bits}")


def _unpack_codes(
    packed: torch.Tensor, bits: int, n_values: int, buffers: WorkBuffers | None
) -> torch.Tensor:
    """The codes of ``_unpack`` (uint8, values identical) in memory the caller may write
    (a reused buffer when ``buffers`` is given). For int4 (the default) the bytes are
    widened to int16 and each one's high nibble moved to the high byte, which on a
    little-endian machine puts every code in its place with contiguous vectorized ops:
    6x faster than two strided nibble writes, which is what a serving runtime's task
    switch spent most time on."""

    def take(role: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        if buffers is None:
            return torch.empty(n, dtype=dtype, device=packed.device)
        return buffers.take(role, n, dtype, packed.device)

    if bits != 4 or packed.dtype != torch.uint8 or packed.dim() != 1 or sys.byteorder != "little":
        codes = _unpack(packed, bits, n_values)
        return take("codes", n_values, torch.uint8).copy_(codes)  # never the stored codes
    if packed.numel() != _packed_bytes(n_values, bits):
        _unpack(packed, bits, n_values)  # raises the size error
    words = take("codes", 2 * packed.numel(), torch.uint8).view(torch.int16)
    high = take("high-nibbles", packed.numel(), torch.int16)
    words.copy_(packed)
    torch.bitwise_left_shift(words, 4, out=high).bitwise_and_(0x0F00)
    words.bitwise_and_(0x000F).bitwise_or_(high)
    return words.view(torch.uint8)[:n_values]


def _unpack(packed: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("quantized codes must be a 1-D uint8 tensor")
    if packed.numel() != _packed_bytes(n_values, bits):
        raise ValueError(
            f"quantized codes hold {packed.numel()} bytes, expected "
            f"{_packed_bytes(n_values, bits)} for {n_values} int{bits} values"
        )
    if bits == 8:
        return packed
    if bits == 4:
        out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)
        return out[:n_values]
    if bits == 3:
        pad = (-packed.numel()) % 3
        data = torch.cat([packed, packed.new_zeros(pad)]) if pad else packed
        triples = data.view(-1, 3).to(torch.int32)
        word = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        out = torch.stack([(word >> (3 * i)) & 0x7 for i in range(8)], dim=1)
        return out.reshape(-1)[:n_values].to(torch.uint8)
    raise ValueError(f"unsupported bit width {bits}")
