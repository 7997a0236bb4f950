"""Property tests of the maps: orthogonal, exactly invertible, seed-dependent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from randes.checkpoint import TensorMeta
from randes.config import MAPS, MapName, TransformConfig
from randes.layout import layer_group_key, plan_layout
from randes.rng import ELEMENT_CHUNK, element_sign_vector, row_sign_vector, sign_vector
from randes.transforms import (
    TaskTransform,
    apply_map_,
    element_flip_,
    flip,
    flip_,
    side_signs,
    two_sided_flip_,
)
from tests.core.helpers import gpt2_like

SEEDS = st.integers(min_value=0, max_value=2**63 - 1)
CONFIGS = st.builds(
    TransformConfig,
    sign_flip=st.booleans(),
    map=st.sampled_from(MAPS),
    layer_shuffle=st.booleans(),
    rank1=st.sampled_from(["flip", "plain", "private"]),
)


@st.composite
def models(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n_layer = draw(st.integers(min_value=1, max_value=4))
    d = draw(st.integers(min_value=1, max_value=5))
    seed = draw(st.integers(min_value=0, max_value=2**31))
    base = gpt2_like(n_layer=n_layer, d=d, vocab=7, n_pos=5, seed=seed)
    return {k: v.double() if v.is_floating_point() else v for k, v in base.items()}


def _superposed(tensors: dict[str, torch.Tensor], config: TransformConfig):  # type: ignore[no-untyped-def]
    metas = {k: TensorMeta(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    layout = plan_layout(metas, config)
    return layout, {k: tensors[k] for k in layout.superposed}


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d[k].reshape(-1) for k in sorted(d)])


@settings(max_examples=40, deadline=None)
@given(models(), SEEDS, CONFIGS, st.integers(min_value=0, max_value=2**31))
def test_maps_are_orthogonal(
    x_all: dict[str, torch.Tensor], seed: int, config: TransformConfig, other: int
) -> None:
    layout, x = _superposed(x_all, config)
    g = torch.Generator().manual_seed(other)
    y = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in x.items()}
    t = TaskTransform(layout, seed)
    tx, ty = t.scramble(x), t.scramble(y)
    assert set(tx) == set(x)  # slots are exactly the superposed names
    for k in tx:
        assert tx[k].shape == x[k].shape
    fx, fy, ftx, fty = _flat(x), _flat(y), _flat(tx), _flat(ty)
    assert torch.allclose(ftx.norm(), fx.norm(), rtol=1e-12)
    assert torch.allclose(ftx @ fty, fx @ fy, rtol=1e-9, atol=1e-9)
    # a signed permutation of coordinates: same multiset of magnitudes
    assert torch.equal(ftx.abs().sort().values, fx.abs().sort().values)


@settings(max_examples=40, deadline=None)
@given(models(), SEEDS, CONFIGS)
def test_unscramble_inverts_scramble_exactly(
    x_all: dict[str, torch.Tensor], seed: int, config: TransformConfig
) -> None:
    layout, x = _superposed(x_all, config)
    t = TaskTransform(layout, seed)
    back = t.unscramble(t.scramble(x))
    assert set(back) == set(x)
    for k in x:
        assert torch.equal(back[k], x[k])
    # scrambling really is an inverse pair of placements
    for source in layout.superposed:
        assert t.source_of(t.slot_of(source)) == source


@settings(max_examples=50, deadline=None)
@given(
    SEEDS,
    st.text(max_size=20),
    st.lists(st.integers(0, 6), min_size=0, max_size=4),
    st.sampled_from(MAPS),
)
def test_every_sign_map_is_self_inverse(
    seed: int, name: str, shape: list[int], kind: MapName
) -> None:
    x = torch.randn(shape, dtype=torch.float64)
    once = flip(seed, name, x, kind)
    assert torch.equal(flip(seed, name, once, kind), x)
    assert torch.equal(once.abs(), x.abs())
    y = x.clone()
    assert apply_map_(kind, seed, name, y) is y and torch.equal(y, once)


def test_column_flip_is_per_column() -> None:
    x = torch.ones(4, 3, 2)
    y = flip(9, "w", x).reshape(4, 6)
    assert torch.equal(y, y[0].expand(4, 6))  # one sign per column, shared by all rows
    assert torch.equal(flip_(9, "w", torch.ones(4, 3, 2)), flip(9, "w", x, "columns"))


def test_two_sided_is_row_signs_times_column_signs() -> None:
    """D_r W D_c with the column map's D_c: rank > 2 viewed as (shape[0], -1)."""
    x = torch.ones(5, 3, 2)
    y = two_sided_flip_(9, "w", x.clone()).reshape(5, 6)
    expected = torch.outer(row_sign_vector(9, "w", 5), sign_vector(9, "w", 6))
    assert torch.equal(y, expected)
    rows, cols = side_signs("two-sided", 9, "w", (5, 3, 2))
    assert rows is not None and torch.equal(torch.outer(rows, cols), expected)
    assert side_signs("columns", 9, "w", (5, 6))[0] is None
    assert not torch.equal(y, y[0].expand(5, 6))  # rows differ: not the column map
    with pytest.raises(ValueError):
        side_signs("elementwise", 9, "w", (5, 6))


def test_two_sided_acts_on_activations() -> None:
    """What the row/column factorization is for: (D_r W D_c) x = D_r (W (D_c x))."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 4, generator=g), torch.randn(4, generator=g)
    rows, cols = side_signs("two-sided", 3, "w", (6, 4))
    assert rows is not None
    assert torch.allclose(flip(3, "w", w, "two-sided") @ x, rows * (w @ (cols * x)))


def test_elementwise_is_one_sign_per_entry_across_chunks() -> None:
    """A tensor longer than one chunk gets exactly the concatenated chunk streams."""
    x = torch.ones(2 * ELEMENT_CHUNK // 17 + 1, 17)  # a little over two chunks
    n = x.numel()
    y = element_flip_(4, "wte.weight", x.clone())
    assert torch.equal(y.reshape(-1), element_sign_vector(4, "wte.weight", n))
    # no row or column structure: rows are not all +-the first one
    first = y[0]
    assert not all(torch.equal(r, first) or torch.equal(r, -first) for r in y[:50])
    assert abs(float(y.mean())) < 0.01  # balanced signs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", MAPS)
def test_maps_are_exact_in_every_float_dtype(dtype: torch.dtype, kind: MapName) -> None:
    x = torch.randn(7, 5).to(dtype)
    once = flip(11, "h.0.w", x, kind)
    assert once.dtype == dtype
    assert torch.equal(once.float().abs(), x.float().abs())
    assert torch.equal(flip(11, "h.0.w", once, kind), x)


def test_rank1_tensors_under_each_map() -> None:
    """Vectors: the column and two-sided maps flip them with sign_vector (as before the map
    setting existed), the elementwise map with its own stream."""
    v = torch.ones(40)
    assert torch.equal(flip(2, "b", v, "columns"), sign_vector(2, "b", 40))
    assert torch.equal(flip(2, "b", v, "two-sided"), sign_vector(2, "b", 40))
    assert torch.equal(flip(2, "b", v, "elementwise"), element_sign_vector(2, "b", 40))


def test_maps_differ_from_each_other() -> None:
    base = gpt2_like(n_layer=2, d=4, vocab=6, n_pos=4)
    out = {}
    for kind in MAPS:
        layout, x = _superposed(base, TransformConfig(map=kind, rank1="flip"))
        out[kind] = _flat(TaskTransform(layout, 77).scramble(x))
    assert not torch.equal(out["columns"], out["two-sided"])
    assert not torch.equal(out["columns"], out["elementwise"])
    assert not torch.equal(out["two-sided"], out["elementwise"])


@settings(deadline=None)  # a shared, loaded CI machine: time is not what this checks
@given(SEEDS, SEEDS)
def test_different_seeds_give_different_maps(s1: int, s2: int) -> None:
    if s1 == s2:
        return
    base = gpt2_like(n_layer=4, d=4, vocab=6, n_pos=4)
    layout, x = _superposed(base, TransformConfig(rank1="flip"))
    a, b = TaskTransform(layout, s1).scramble(x), TaskTransform(layout, s2).scramble(x)
    assert not torch.equal(_flat(a), _flat(b))


def test_layout_groups_and_policies() -> None:
    base = gpt2_like(n_layer=3, d=4)
    metas = {k: TensorMeta(v.dtype, tuple(v.shape)) for k, v in base.items()}
    private = plan_layout(metas, TransformConfig(rank1="private"))
    assert "position_ids" in private.non_float and "position_ids" not in private.superposed
    assert "h.0.ln_1.bias" in private.private_base
    assert "h.0.ln_1.bias" not in private.superposed
    assert private.groups["h.{}.mlp.c_fc.weight"] == tuple(
        f"h.{i}.mlp.c_fc.weight" for i in range(3)
    )
    assert "h.{}.ln_1.bias" not in private.groups

    flipping = plan_layout(metas, TransformConfig(rank1="flip"))
    assert "h.{}.ln_1.bias" in flipping.groups and "h.0.ln_1.bias" in flipping.flipped

    plain = plan_layout(metas, TransformConfig(rank1="plain"))
    assert "h.0.ln_1.bias" in plain.superposed
    assert "h.0.ln_1.bias" not in plain.flipped and "h.{}.ln_1.bias" not in plain.groups

    off = plan_layout(metas, TransformConfig(sign_flip=False, layer_shuffle=False))
    assert not off.flipped and not off.groups
    t = TaskTransform(off, 5)
    x = {k: base[k] for k in off.superposed}
    assert all(torch.equal(v, x[k]) for k, v in t.scramble(x).items())


def test_mismatched_group_members_are_not_shuffled() -> None:
    metas = {
        "layers.0.w": TensorMeta(torch.float32, (4, 4)),
        "layers.1.w": TensorMeta(torch.float32, (4, 4)),
        "layers.2.w": TensorMeta(torch.float32, (4, 5)),
        "blocks.0.w": TensorMeta(torch.float32, (2, 2)),
        "blocks.1.w": TensorMeta(torch.float16, (2, 2)),
        "stages.10.w": TensorMeta(torch.float32, (2,)),
        "stages.2.w": TensorMeta(torch.float32, (2,)),
    }
    layout = plan_layout(metas, TransformConfig(rank1="flip"))
    assert "layers.{}.w" not in layout.groups and "blocks.{}.w" not in layout.groups
    assert layout.groups["stages.{}.w"] == ("stages.2.w", "stages.10.w")  # numeric order


def test_layer_group_key() -> None:
    assert layer_group_key("h.3.mlp.c_fc.weight") == ("h.{}.mlp.c_fc.weight", 3)
    assert layer_group_key("enc.layer.12.experts.5.w") == ("enc.layer.{}.experts.5.w", 12)
    assert layer_group_key("wte.weight") is None
