"""Mixed-task batches over a `BundleRuntime`: rows of one batch served by different tasks.

`build_mixed` takes a model of one task (``rt.model(tasks[0])``, or a module the caller
built) and replaces its leaf modules by the layers of `randes.mixed`:

- ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Embedding`` whose weight is superposed under
  a map acting on rows and columns only: the base weight (the runtime's own when it is
  resident, else read once) + per task a signed slot of the dequantized superposition;
- ``nn.LayerNorm`` with per-task weights: stacked per task, gathered per row;
- any other leaf whose tensors differ per task: run per group of rows with that task's
  own tensors (the per-task state dict fallback, for that module only; an elementwise
  map ends up here, at one weight copy per task);
- tensors equal for every task are left where they are.

Every per-task tensor comes from the task's retrieval plan (`BundleRuntime.plan`), the
signs from the task's own transform (`randes.mixed.sign_structure`), and lambda from
the same scale the plan uses, so each row sees its task's model up to float rounding.
Memory: base (shared with a runtime whose base is resident) + the superposition slots
dequantized once (one model's size) + the small per-task tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from randes.mixed import (
    BatchTasks,
    MixedConv1D,
    MixedEmbedding,
    MixedLinear,
    PerTaskLeaf,
    SignedSlot,
    StackedLayerNorm,
    sign_structure,
)
from randes.retrieve import TaskRetrieval, _scale_for
from storage.runtime_readers import FileBaseReader, ResidentReader
from storage.runtime_sources import BundleRuntimeError


class BundleRuntime(Protocol):
    """What a mixed model needs of `storage.runtime.BundleRuntime` (named here, not
    imported, so that the runtime can build mixed models without an import cycle)."""

    device: torch.device
    base: ResidentReader | FileBaseReader
    superposition: Any

    def info(self, task: str) -> Any: ...

    def model(self, task: str) -> nn.Module: ...

    def plan(self, task: str) -> TaskRetrieval: ...


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D, recognized without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


class MixedBatchModel(nn.Module):
    """``model(row_tasks, **inputs)``: row i of the inputs is served by task row_tasks[i]."""

    def __init__(
        self, model: nn.Module, ctx: BatchTasks, tasks: Sequence[str], device: torch.device
    ) -> None:
        super().__init__()
        self.model = model
        self.device = device
        """Where the runtime keeps its tensors: the mixed layers hold them as plain
        attributes (shared with the runtime), so ``.to()`` does not move them."""
        self.ctx = ctx
        self.tasks = list(tasks)
        self._index = {t: i for i, t in enumerate(self.tasks)}
        self.fallback: list[str] = []
        """Modules served per group of rows with per-task tensors (no signed-slot path)."""
        self.per_task_bytes = 0
        self.slot_bytes = 0

    def forward(self, row_tasks: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        try:
            index = [self._index[t] for t in row_tasks]
        except KeyError as exc:
            raise KeyError(f"task {exc.args[0]!r} is not served by this mixed model") from None
        self.ctx.set(torch.tensor(index, dtype=torch.long, device=self.device))
        try:
            return self.model(*args, **kwargs)
        finally:
            self.ctx.clear()


class _Builder:
    def __init__(self, rt: BundleRuntime, tasks: Sequence[str], module: nn.Module) -> None:
        self.rt = rt
        self.tasks = list(tasks)
        self.plans: list[TaskRetrieval] = [rt.plan(t) for t in self.tasks]
        specs = [sorted((s.name, s.shape, str(s.dtype)) for s in p.specs()) for p in self.plans]
        names = [[name for name, _, _ in spec] for spec in specs]
        for task, other in zip(self.tasks[1:], specs[1:], strict=True):
            if other != specs[0]:
                raise BundleRuntimeError(
                    f"tasks {self.tasks[0]!r} and {task!r} do not have the same tensors "
                    "(names, shapes or dtypes differ): serve them in separate mixed models"
                )
        self.module = module
        self.ctx = BatchTasks()
        self.slots: dict[str, torch.Tensor] = {}
        self.error = BundleRuntimeError
        state = module.state_dict(keep_vars=True)
        planned = set(names[0])
        owner = {int(state[n].untyped_storage().data_ptr()): n for n in state if n in planned}
        # a module name -> the planned name it holds (itself, or the tensor it is tied to)
        self.alias = {
            n: n if n in planned else owner.get(int(t.untyped_storage().data_ptr()), "")
            for n, t in state.items()
        }
        self.result = MixedBatchModel(module, self.ctx, self.tasks, rt.device)

    # -- per-task values -------------------------------------------------------
    def values(self, name: str) -> list[torch.Tensor]:
        ck = self.alias[name]
        return [plan.tensor(ck).to(self.rt.device) for plan in self.plans]

    def varies(self, name: str) -> bool:
        """Whether tasks differ on ``name``: superposed tensors do; base-only ones
        (buffers) do not; private ones are compared, one task at a time."""
        ck = self.alias[name]
        sources = [plan.plan[ck][0] for plan in self.plans]
        if any(
            s is not None and s in p.layout.superposed
            for s, p in zip(sources, self.plans, strict=True)
        ):
            return True
        if all(s is not None for s in sources):
            return False
        first = self.plans[0].tensor(ck)
        return any(not torch.equal(first, plan.tensor(ck)) for plan in self.plans[1:])

    def signed(self, name: str) -> list[SignedSlot] | None:
        """Each task's signed slot for weight ``name``, or None when some task's map is
        not a row/column one (or the weight is not superposed)."""
        ck = self.alias[name]
        out = []
        for plan in self.plans:
            source, meta = plan.plan[ck]
            if source is None or source not in plan.layout.superposed or len(meta.shape) != 2:
                return None
            transform, src = plan.transform, source

            def unscramble(t: torch.Tensor) -> torch.Tensor:
                return transform.unscramble_one(src, t, inplace=True)  # noqa: B023 - used now

            signs = sign_structure(unscramble, tuple(meta.shape))
            if signs is None:
                return None
            rows, cols = (None if s is None else s.to(self.rt.device, meta.dtype) for s in signs)
            out.append(
                SignedSlot(
                    self.slot(plan.transform.slot_of(source), meta.dtype),
                    rows,
                    cols,
                    _scale_for(plan.scale, source),
                )
            )
        return out

    def slot(self, slot: str, dtype: torch.dtype) -> torch.Tensor:
        if slot not in self.slots:
            value = self.rt.superposition.get(slot).to(device=self.rt.device, dtype=dtype)
            self.slots[slot] = value
            self.result.slot_bytes += value.numel() * value.element_size()
        return self.slots[slot]

    def stack(self, name: str | None) -> torch.Tensor | None:
        if name is None:
            return None
        stacked = torch.stack(self.values(name))
        self.result.per_task_bytes += stacked.numel() * stacked.element_size()
        return stacked

    # -- modules ---------------------------------------------------------------
    def build(self) -> MixedBatchModel:
        for path, module in list(self.module.named_modules()):
            own = [n for n, _ in module.named_parameters(recurse=False)]
            own += [n for n, _ in module.named_buffers(recurse=False)]
            full = {n: f"{path}.{n}" if path else n for n in own}
            varying = [f for f in full.values() if f in self.alias and self.varies(self._named(f))]
            if not varying:
                continue
            if any(True for _ in module.children()):
                raise self.error(
                    f"module {path or type(module).__name__!r} holds per-task tensors itself "
                    "and has submodules: no mixed-batch path, switch per task instead"
                )
            self._replace(path, self._wrap(path, module, full))
        return self.result

    def _superposed(self, name: str) -> bool:
        source = self.plans[0].plan[self.alias[name]][0]
        return source is not None and source in self.plans[0].layout.superposed

    def _named(self, name: str) -> str:
        if not self.alias[name]:
            raise self.error(f"module tensor {name!r} is set by no task of this bundle")
        return name

    def _wrap(self, path: str, module: nn.Module, full: Mapping[str, str]) -> nn.Module:
        weight, bias = full.get("weight"), full.get("bias")
        kinds = (nn.Linear, nn.Embedding)
        if weight is not None and (isinstance(module, kinds) or _is_conv1d(module)):
            extra = set(full) - {"weight", "bias"}
            emb_ok = not isinstance(module, nn.Embedding) or module.max_norm is None
            deltas = self.signed(weight) if not extra and emb_ok else None
            if deltas is not None:
                base = self.rt.base.view(self.plans[0].plan[self.alias[weight]][0] or "")
                if isinstance(module, nn.Embedding):
                    return MixedEmbedding(
                        self.ctx, base, deltas, None, padding_idx=module.padding_idx
                    )
                cls = MixedLinear if isinstance(module, nn.Linear) else MixedConv1D
                return cls(self.ctx, base, deltas, self.stack(bias))
        if isinstance(module, nn.LayerNorm) and set(full) <= {"weight", "bias"}:
            return StackedLayerNorm(
                self.ctx, module.normalized_shape, module.eps, self.stack(weight), self.stack(bias)
            )
        per_task = [
            dict(zip(full, vs, strict=True))
            for vs in zip(*(self.values(f) for f in full.values()), strict=True)
        ]
        if any(self._superposed(f) for f in full.values() if f in self.alias):
            self.result.fallback.append(path)  # a superposed weight without the fast path
        self.result.per_task_bytes += sum(
            t.numel() * t.element_size() for tensors in per_task for t in tensors.values()
        )
        return PerTaskLeaf(self.ctx, module, per_task)

    def _replace(self, path: str, new: nn.Module) -> None:
        if not path:
            raise self.error("the model itself is a single per-task leaf: nothing to mix")
        parent_path, _, attr = path.rpartition(".")
        setattr(self.module.get_submodule(parent_path), attr, new)


def build_mixed(
    rt: BundleRuntime, tasks: Sequence[str], module: nn.Module | None = None
) -> MixedBatchModel:
    """A `MixedBatchModel` serving ``tasks`` of ``rt`` (see the module docstring).

    ``module`` is a model holding any of the tasks (default: ``rt.model(tasks[0])``); it
    becomes the mixed model's skeleton and must not be used on its own afterwards.
    """
    if not tasks:
        raise ValueError("a mixed model needs at least one task")
    for task in tasks:
        rt.info(task)
    model = module if module is not None else rt.model(tasks[0])
    return _Builder(rt, tasks, model).build()
