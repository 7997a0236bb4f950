"""Mixed-task batches: each row of one batch served by its own task, nothing materialized.

Reference: the per-task models (`rt.model(task)`, bit-identical to materialize) run on
the same rows; the mixed model must agree within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from randes.mixed import (
    MixedConv1D,
    MixedEmbedding,
    MixedLinear,
    PerTaskLeaf,
    StackedLayerNorm,
    sign_structure,
)
from storage.mixed import build_mixed
from storage.runtime import BundleRuntime, BundleRuntimeError
from tests.runtime.conftest import Served
from tests.runtime.hf_models import inputs

SAME_HEAD = ["t1", "t3"]  # 3 labels each (t2 has 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _reference(rt: BundleRuntime, row_tasks: list[str], batch: dict) -> torch.Tensor:
    rows = []
    models = {t: rt.model(t) for t in set(row_tasks)}
    with torch.no_grad():
        for i, task in enumerate(row_tasks):
            one = {k: v[i : i + 1] for k, v in batch.items()}
            rows.append(models[task](**one).logits)
    return torch.cat(rows)


def test_mixed_batch_equals_per_task_models(served: Served) -> None:
    batch = inputs(5, batch=6)
    row_tasks = ["t1", "t3", "t3", "t1", "t3", "t1"]
    with BundleRuntime.open(served.pulled, base_resident=True) as rt:
        mixed = rt.mixed(SAME_HEAD)
        assert mixed.fallback == [] and mixed.slot_bytes > 0
        kinds = {type(m) for m in mixed.modules()}
        assert MixedEmbedding in kinds and StackedLayerNorm in kinds
        assert (MixedConv1D if served.arch == "gpt2" else MixedLinear) in kinds
        with torch.no_grad():
            got = mixed(row_tasks, **batch).logits
        want = _reference(rt, row_tasks, batch)
        assert _rel(got, want) < 1e-5
        # rows of one task: the same as that task alone; all rows one task works too
        with torch.no_grad():
            only = mixed(["t3"] * 6, **batch).logits
            assert _rel(only, rt.model("t3")(**batch).logits) < 1e-5
        # the mixed model holds the runtime's resident base by reference, not a copy
        linear = next(m for m in mixed.modules() if isinstance(m, (MixedLinear, MixedConv1D)))
        assert any(linear.base is rt.base.view(n) for n in rt.base)


def test_mixed_batch_with_superposed_biases_and_norms(served_flip: Served) -> None:
    batch = inputs(9, batch=4)
    row_tasks = ["t3", "t1", "t1", "t3"]
    with BundleRuntime.open(served_flip.pulled) as rt:
        mixed = rt.mixed(SAME_HEAD)
        with torch.no_grad():
            got = mixed(row_tasks, **batch).logits
        assert _rel(got, _reference(rt, row_tasks, batch)) < 1e-5


def test_tasks_with_different_heads_or_unknown_tasks_are_refused(served: Served) -> None:
    with BundleRuntime.open(served.pulled) as rt:
        with pytest.raises(BundleRuntimeError, match="do not have the same tensors"):
            rt.mixed(["t1", "t2"])
        mixed = rt.mixed(["t1"])
        with pytest.raises(KeyError, match="not served by this mixed model"):
            mixed(["t3"], **inputs(1, batch=1))
        with pytest.raises(ValueError, match="batch has 2 rows but 1 tasks"):
            mixed(["t1"], **inputs(1, batch=2))


class _Scaled(nn.Module):
    """A leaf type the mixed layers do not know: served per group of rows."""

    def __init__(self, inner: nn.Module, *, conv1d: bool = False) -> None:
        super().__init__()
        self.weight = inner.weight
        self.bias = inner.bias
        self.conv1d = conv1d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.weight if self.conv1d else self.weight.T)
        return y + self.bias if self.bias is not None else y


def test_unknown_leaf_modules_fall_back_to_per_task_tensors(served: Served) -> None:
    batch = inputs(3, batch=4)
    row_tasks = ["t1", "t3", "t1", "t3"]
    with BundleRuntime.open(served.pulled) as rt:
        model = rt.model("t1")
        if served.arch == "bert":
            model.classifier = _Scaled(model.classifier)  # private head
            superposed = "bert.pooler.dense"
            model.bert.pooler.dense = _Scaled(model.bert.pooler.dense)
        else:
            model.score = _Scaled(model.score)
            superposed = "transformer.h.1.mlp.c_fc"
            block = model.transformer.h[1].mlp
            block.c_fc = _Scaled(block.c_fc, conv1d=True)
        mixed = build_mixed(rt, SAME_HEAD, model)
        assert mixed.fallback == [superposed]  # the head is private: not a fallback
        assert any(isinstance(m, PerTaskLeaf) for m in mixed.modules())
        with torch.no_grad():
            got = mixed(row_tasks, **batch).logits
        assert _rel(got, _reference(rt, row_tasks, batch)) < 1e-5


def test_sign_structure_reads_row_and_column_maps_and_refuses_elementwise() -> None:
    gen = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (5,), generator=gen).float() * 2 - 1
    c = torch.randint(0, 2, (7,), generator=gen).float() * 2 - 1
    rows, cols = sign_structure(lambda t: t * c, (5, 7))  # columns map
    assert rows is None and torch.equal(cols, c)
    rows, cols = sign_structure(lambda t: r[:, None] * t * c, (5, 7))  # two-sided
    assert torch.equal(rows[:, None] * cols[None, :], r[:, None] * c[None, :])
    assert sign_structure(lambda t: t, (5, 7)) == (None, None)  # no flips
    e = torch.randint(0, 2, (5, 7), generator=gen).float() * 2 - 1
    assert sign_structure(lambda t: t * e, (5, 7)) is None  # elementwise: no structure
    assert sign_structure(lambda t: t, (5,)) is None


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_two_sided_signed_layers_match_the_dense_weight(kind: str) -> None:
    """The layers already take row signs (two-sided maps): checked against W_t dense."""
    from randes.mixed import BatchTasks, SignedSlot

    gen = torch.Generator().manual_seed(1)
    shape = (6, 4)
    base = torch.randn(shape, generator=gen)
    deltas, dense = [], []
    for _ in range(3):
        slot = torch.randn(shape, generator=gen)
        r = torch.randint(0, 2, (shape[0],), generator=gen).float() * 2 - 1
        c = torch.randint(0, 2, (shape[1],), generator=gen).float() * 2 - 1
        deltas.append(SignedSlot(slot, r, c, 0.7))
        dense.append(base + 0.7 * r[:, None] * slot * c[None, :])
    ctx = BatchTasks()
    row_task = torch.tensor([2, 0, 1, 2])
    ctx.set(row_task)
    if kind == "embedding":
        x = torch.randint(0, shape[0], (4, 5), generator=gen)
        y = MixedEmbedding(ctx, base, deltas, None)(x)
        want = torch.stack([dense[int(k)][x[i]] for i, k in enumerate(row_task)])
    else:
        width = shape[1] if kind == "linear" else shape[0]
        x = torch.randn(4, 3, width, generator=gen)
        layer = (MixedLinear if kind == "linear" else MixedConv1D)(ctx, base, deltas, None)
        y = layer(x)
        want = torch.stack(
            [
                x[i] @ (dense[int(k)].T if kind == "linear" else dense[int(k)])
                for i, k in enumerate(row_task)
            ]
        )
    assert _rel(y, want) < 1e-6
