"""Properties of the serving codec (randes.quantize), over generated tensors and schemes.

What serving relies on: the layout is exactly what `QuantScheme.layout` predicts (a
reader checks stored sizes against it), every value comes back within half a step of
its group's scale, quantizing what was dequantized changes nothing, and the edge cases
(zero tensors, empty tensors, odd lengths for the 8-values-in-3-bytes int3 packing,
per-row grouping of 1-D tensors) hold.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randes.quantize import QuantizedTensor, QuantScheme, dequantize, fake_quantize, quantize

SETTINGS = settings(max_examples=60, deadline=None)

schemes = st.builds(
    QuantScheme,
    bits=st.sampled_from([8, 4, 3]),
    group_size=st.one_of(st.none(), st.integers(min_value=8, max_value=96)),
)
shapes = st.one_of(
    st.tuples(st.integers(0, 70)),
    st.tuples(st.integers(0, 9), st.integers(0, 40)),
    st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 7)),
)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0]))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * magnitude
    if draw(st.booleans()) and x.numel():  # sparse rows / groups: exact zeros mixed in
        x[torch.rand(shape, generator=gen) < 0.5] = 0.0
    return x


def _scale_of_each(x: torch.Tensor, q: QuantizedTensor, scheme: QuantScheme) -> torch.Tensor:
    """The scale every element of ``x`` was quantized with (flattened order)."""
    group = scheme.group_of(tuple(x.shape))
    return q.scales.repeat_interleave(group)[: x.numel()]


@SETTINGS
@given(x=tensors(), scheme=schemes)
def test_sizes_are_exactly_what_the_layout_predicts(x: torch.Tensor, scheme: QuantScheme) -> None:
    q = quantize(x, scheme)
    n_codes, n_scales = scheme.layout(tuple(x.shape))
    assert q.codes.dtype == torch.uint8 and tuple(q.codes.shape) == (n_codes,)
    assert q.scales.dtype == torch.float32 and tuple(q.scales.shape) == (n_scales,)
    group = scheme.group_of(tuple(x.shape))
    assert n_scales == max(1, math.ceil(x.numel() / group))
    assert n_codes == math.ceil(n_scales * group * scheme.bits / 8)
    assert scheme.nbytes(tuple(x.shape)) == n_codes + 4 * n_scales


@SETTINGS
@given(x=tensors(), scheme=schemes)
def test_every_value_is_within_half_a_step(x: torch.Tensor, scheme: QuantScheme) -> None:
    q = quantize(x, scheme)
    back = dequantize(q, tuple(x.shape), scheme)
    assert back.shape == x.shape and back.dtype == torch.float32
    step = _scale_of_each(x, q, scheme)
    err = (x.reshape(-1) - back.reshape(-1)).abs()
    # half a step, plus the float32 rounding of x / scale and of code * scale
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-30).all())
    assert bool((q.scales >= 0).all())


@SETTINGS
@given(x=tensors(), scheme=schemes)
def test_fake_quantize_is_idempotent(x: torch.Tensor, scheme: QuantScheme) -> None:
    once = fake_quantize(x, scheme)
    twice = fake_quantize(once, scheme)
    # the same codes, and the same values up to the last bit of a recomputed scale
    assert torch.equal(quantize(once, scheme).codes, quantize(x, scheme).codes)
    assert torch.allclose(twice, once, rtol=2e-7, atol=0.0)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 7, 8, 9, 15, 17, 23, 63, 65, 101])
@pytest.mark.parametrize("group_size", [None, 8, 24])
def test_int3_packing_with_odd_lengths(length: int, group_size: int | None) -> None:
    scheme = QuantScheme(bits=3, group_size=group_size)
    gen = torch.Generator().manual_seed(length)
    x = torch.randn(length, generator=gen)
    q = quantize(x, scheme)
    group = scheme.group_of((length,))
    padded = math.ceil(length / group) * group
    assert q.codes.numel() == math.ceil(padded * 3 / 8)
    # every int3 code -3..3 survives packing and unpacking, whatever the length
    back = dequantize(q, (length,), scheme)
    codes = torch.round(back / q.scales.repeat_interleave(group)[:length]).to(torch.int64)
    want = torch.round(x / q.scales.repeat_interleave(group)[:length]).clamp(-3, 3)
    assert torch.equal(codes, want.to(torch.int64))
    assert {int(c) for c in codes} <= set(range(-3, 4))


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("shape", [(0,), (4, 0), (0, 5), (7,), (3, 33)])
def test_zero_and_empty_tensors(bits: int, shape: tuple[int, ...]) -> None:
    scheme = QuantScheme(bits=bits, group_size=16)
    x = torch.zeros(shape)
    q = quantize(x, scheme)
    assert bool((q.scales == 0).all())
    assert (q.codes.numel(), q.scales.numel()) == scheme.layout(shape)
    back = dequantize(q, shape, scheme)
    assert back.shape == x.shape and not bool(back.any())


def test_per_row_grouping() -> None:
    row = QuantScheme(bits=8, group_size=None)
    assert row.group_of((37,)) == 37 and row.layout((37,)) == (37, 1)  # 1-D: one row
    assert row.group_of((6, 10)) == 10 and row.layout((6, 10)) == (60, 6)
    assert row.group_of((2, 3, 4)) == 12 and row.layout((2, 3, 4))[1] == 2
    x = torch.tensor([1.0, -2.0, 0.75, 127.0])
    q = quantize(x, row)
    assert q.scales.tolist() == [1.0]  # absmax 127 over qmax 127
    assert torch.equal(dequantize(q, (4,), row), torch.tensor([1.0, -2.0, 1.0, 127.0]))


def test_bits_per_value_of_the_formats() -> None:
    """What the README quotes: int4-g64 is 4.5 bits per value (14% of fp32), int8-g64
    8.5 (27%), int3-g64 3.5 (11%)."""
    shape = (4096, 4096)
    fp32 = 4 * math.prod(shape)
    ratios = {
        QuantScheme(bits=b, group_size=64).name: QuantScheme(bits=b, group_size=64).nbytes(shape)
        / fp32
        for b in (8, 4, 3)
    }
    assert ratios == pytest.approx(
        {"int8-g64": 8.5 / 32, "int4-g64": 4.5 / 32, "int3-g64": 3.5 / 32}
    )


@SETTINGS
@given(x=tensors(), scheme=schemes)
def test_dequantize_is_codes_minus_offset_times_scale_exactly(
    x: torch.Tensor, scheme: QuantScheme
) -> None:
    """The fast int4 path of dequantize gives the reference formula's values bit for bit
    (what every materialized model and the serving runtime depend on)."""
    from randes.quantize import _qmax, _unpack

    q = quantize(x, scheme)
    group = scheme.group_of(tuple(x.shape))
    n = q.scales.numel() * group
    ref = (_unpack(q.codes, scheme.bits, n).to(torch.float32) - _qmax(scheme.bits)).view(-1, group)
    ref = (ref * q.scales[:, None]).reshape(-1)[: x.numel()].reshape(x.shape)
    assert torch.equal(dequantize(q, tuple(x.shape), scheme), ref)


def _whole_tensor_quantize(
    x: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole-tensor formula the blockwise quantizer must reproduce bit for bit."""
    from randes.quantize import _pack, _qmax

    group = scheme.group_of(tuple(x.shape))
    rows = x.reshape(-1).to(torch.float32).view(-1, group)
    qmax = _qmax(scheme.bits)
    scales = rows.abs().amax(dim=1) / qmax
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(rows / safe[:, None]).clamp_(-qmax, qmax).to(torch.int16) + qmax
    return _pack(codes.reshape(-1).to(torch.uint8), scheme.bits), scales


@pytest.mark.parametrize("bits", [4, 8, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(600, 1000), (3, 64), (2 * 5 * 4096 + 8, 8)])
def test_blockwise_quantize_equals_the_whole_tensor_formula(
    bits: int, dtype: torch.dtype, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors of many blocks (600k values against blocks of 2**14: the last one short),
    zero groups and exact .5 ties included: same codes and scales as the formula."""
    import randes.quantize as q

    monkeypatch.setattr(q, "_CHUNK_VALUES", 1 << 14)
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    x.view(-1)[:64] = 0
    x.view(-1)[-3:] = torch.tensor([0.5, -0.5, 0.25], dtype=dtype) * 0.02
    for scheme in (QuantScheme(bits=bits), QuantScheme(bits=bits, group_size=None)):  # type: ignore[arg-type]
        codes, scales = _whole_tensor_quantize(x, scheme)
        got = quantize(x, scheme)
        assert torch.equal(got.codes, codes) and torch.equal(got.scales, scales)
