"""Layers that serve a batch whose rows belong to different tasks, without materializing.

When a task's map acts on the rows and columns of a weight only (column sign flips,
two-sided sign flips, with layer shuffling), its weight of one layer is

    W_t = W_base + lambda_t * D_r(t) S_slot(t) D_c(t)

with S_slot the superposition slot layer shuffling gave it, and D_r, D_c diagonal sign
matrices (D_r = I for column flips). A layer never needs W_t itself:

    W_t x = W_base x + lambda_t * D_r (S_slot (D_c x))

so a batch runs one matmul with the shared base for all rows, plus, per group of rows of
one task, one matmul with that task's slot and two sign products: about twice the
flops of a plain layer, whatever the number of tasks, and no per-task weight in memory.
Tensors that differ per task in another way (private heads, norms, biases) are stacked
per task and gathered per row. `BatchTasks` tells every layer which task each row of
the current batch belongs to.

The sign vectors come from the bundle's own transform (`sign_structure`), never redrawn
here, so whatever maps `randes.transforms` adds, a layer either reproduces them exactly
or is refused (an elementwise map has no row/column structure).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class BatchTasks:
    """Which task each row of the batch being served belongs to (shared by all layers)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.groups: list[tuple[int, torch.Tensor]] = []

    def set(self, row_task: torch.Tensor) -> None:
        """``row_task[i]`` = index of row i's task among the model's tasks."""
        self.rows = row_task
        self.groups = [
            (int(k), torch.nonzero(row_task == k).flatten()) for k in torch.unique(row_task)
        ]

    def clear(self) -> None:
        self.rows = None
        self.groups = []

    def check(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row tasks, ``x`` with one row per task). An input of one row shared by the
        batch (BERT's ``position_ids`` buffer of shape (1, T)) is expanded: each task
        reads it through its own weights."""
        if self.rows is None:
            raise RuntimeError("a mixed layer was called outside MixedBatchModel.forward")
        batch = self.rows.shape[0]
        if x.shape[0] == 1 and batch > 1:
            x = x.expand(batch, *x.shape[1:])
        if x.shape[0] != batch:
            raise ValueError(f"batch has {x.shape[0]} rows but {batch} tasks were given")
        return self.rows, x


@dataclass(frozen=True)
class SignedSlot:
    """One task's delta of one weight: ``scale * D_r slot D_c`` (None = no signs)."""

    slot: torch.Tensor
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    scale: float


def sign_structure(
    unscramble: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]
) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
    """(row signs, column signs) of a map acting as ``W -> D_r W D_c`` on a 2-D weight,
    read off the map itself; None when the map is not of that form (elementwise).

    ``unscramble`` applies the task's inverse map to a tensor of ``shape``. Applied to
    all-ones it gives the matrix ``r_i c_j`` when the map has the form, which is
    checked exactly. Signs of value +1 everywhere come back as None.
    """
    if len(shape) != 2:
        return None
    probe = unscramble(torch.ones(shape, dtype=torch.float32))
    if probe.shape != shape or not bool((probe.abs() == 1).all()):
        return None
    rows = probe[:, 0] * probe[0, 0]
    cols = probe[0, :].clone()
    if not torch.equal(probe, rows[:, None] * cols[None, :]):
        return None
    return (None if bool((rows == 1).all()) else rows), (None if bool((cols == 1).all()) else cols)


def _gather(stack: torch.Tensor | None, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row values of a per-task stack, shaped to broadcast over ``like``'s middle dims."""
    assert stack is not None
    picked = stack.index_select(0, rows)
    return picked.view(picked.shape[0], *([1] * (like.dim() - 2)), picked.shape[-1])


class _Mixed(nn.Module):
    def __init__(
        self,
        ctx: BatchTasks,
        base: torch.Tensor,
        deltas: Sequence[SignedSlot],
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.base = base  # resident, shared with the runtime: never written
        self.deltas = list(deltas)
        self.bias_stack = bias  # (tasks, out) or None

    def _add_deltas(self, y: torch.Tensor, x: torch.Tensor, delta: DeltaFn) -> torch.Tensor:
        for k, rows in self.ctx.groups:
            d = self.deltas[k]
            y.index_add_(0, rows, delta(x.index_select(0, rows), d), alpha=d.scale)
        return y

    def _add_bias(self, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        if self.bias_stack is None:
            return y
        return y + _gather(self.bias_stack, rows, y)


DeltaFn = Callable[[torch.Tensor, SignedSlot], torch.Tensor]


class MixedLinear(_Mixed):
    """``nn.Linear`` (weight out x in): D_r acts on outputs, D_c on inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, x = self.ctx.check(x)
        y = F.linear(x, self.base)

        def delta(xr: torch.Tensor, d: SignedSlot) -> torch.Tensor:
            if d.cols is not None:
                xr = xr * d.cols
            z = F.linear(xr, d.slot)
            return z * d.rows if d.rows is not None else z

        return self._add_bias(self._add_deltas(y, x, delta), rows)


class MixedConv1D(_Mixed):
    """transformers' GPT-2 ``Conv1D`` (weight in x out, y = x W + b): D_r acts on inputs,
    D_c on outputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, x = self.ctx.check(x)
        y = torch.matmul(x, self.base)

        def delta(xr: torch.Tensor, d: SignedSlot) -> torch.Tensor:
            if d.rows is not None:
                xr = xr * d.rows
            z = torch.matmul(xr, d.slot)
            return z * d.cols if d.cols is not None else z

        return self._add_bias(self._add_deltas(y, x, delta), rows)


class MixedEmbedding(_Mixed):
    """``nn.Embedding`` (weight num x dim): a row of W_t is gathered, signs and all."""

    def __init__(self, *args: object, padding_idx: int | None = None) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.padding_idx = padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        _, ids = self.ctx.check(ids)
        y = F.embedding(ids, self.base, self.padding_idx)

        def delta(ir: torch.Tensor, d: SignedSlot) -> torch.Tensor:
            z = F.embedding(ir, d.slot)
            if d.rows is not None:
                z = z * d.rows[ir].unsqueeze(-1)
            return z * d.cols if d.cols is not None else z

        return self._add_deltas(y, ids, delta)


class StackedLayerNorm(nn.Module):
    """``nn.LayerNorm`` whose weight and bias differ per task: normalized once for the
    whole batch, then scaled and shifted by each row's task."""

    def __init__(
        self,
        ctx: BatchTasks,
        shape: Sequence[int],
        eps: float,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.shape = tuple(shape)
        self.eps = eps
        self.weight_stack = weight  # (tasks, d) or None
        self.bias_stack = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, x = self.ctx.check(x)
        y = F.layer_norm(x, self.shape, None, None, self.eps)
        if self.weight_stack is not None:
            y = y * _gather(self.weight_stack, rows, y)
        if self.bias_stack is not None:
            y = y + _gather(self.bias_stack, rows, y)
        return y


class PerTaskLeaf(nn.Module):
    """Any other one-input leaf module: run once per group of rows with that task's
    tensors (the per-task state dict fallback, restricted to this module)."""

    def __init__(
        self, ctx: BatchTasks, template: nn.Module, tensors: Sequence[dict[str, torch.Tensor]]
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.template = template
        self.tensors = list(tensors)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(f"{type(self.template).__name__}: mixed batches pass one input only")
        _, x = self.ctx.check(x)
        out: torch.Tensor | None = None
        for k, rows in self.ctx.groups:
            part = torch.func.functional_call(
                self.template, self.tensors[k], (x.index_select(0, rows),)
            )
            if out is None:
                out = part.new_empty((x.shape[0], *part.shape[1:]))
            out.index_copy_(0, rows, part)
        assert out is not None
        return out
