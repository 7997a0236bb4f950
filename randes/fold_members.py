"""The members of a batch fold (randes.fold_batch): what each adds to a slot.

A `Member` is a checkpoint: it reads its fine-tuned tensor, subtracts the base's and
scrambles the delta with its task's map (the very helpers randes.fold uses), and
writes its own private tensors. A `Partial` is a task scrambled elsewhere
(`randes.fold_batch.scramble_task`, a worker of a distributed ingest): its slots are
read back. Either way the pass adds the float32 values in the members' order, and a
checkpoint error of a member is raised as `MemberFailed` naming it, so the pass can
refuse that member and fold the others.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.errors import CheckpointError, IncompatibleCheckpointError
from randes.fold import Progress, _delta, check_finite, owned_delta
from randes.keymap import Reconciled
from randes.layout import Layout
from randes.manifest import KeyMap
from randes.source import TensorSource
from randes.transforms import TaskTransform
from randes.writer import ShardWriter, TensorSpec, WrittenShard

P = ParamSpec("P")
R = TypeVar("R")

BASE_CACHE_BYTES = 128 * 2**20
"""Base tensors kept between members: with layer shuffling, the members of one slot
read different base tensors of its layer group, each of them needed again a few slots
later; a small cache saves most of those re-reads at a bounded cost in memory."""

AHEAD_BYTES = 64 * 2**20
"""What a batch pass computes ahead of the slot it adds (members' contributions read,
hashed and scrambled on helper threads, `randes.hashio.ahead`): several tensors, so
both cores stay busy while the caller adds and writes, within a bounded memory."""


@dataclass(frozen=True)
class BatchMember:
    """One checkpoint of a batch and the seed of the task it becomes."""

    checkpoint: CheckpointReader
    seed: int


@dataclass
class MemberFold:
    """What a batch computed for one accepted member: the parts of a task entry."""

    private: list[WrittenShard]
    key_map: KeyMap
    delta_norms: dict[str, float]


class MemberFailed(Exception):
    """Member ``index``'s data failed the pass."""

    def __init__(self, index: int, error: CheckpointError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class BaseTensors:
    """Base tensors by name, the most recently used kept within a byte budget.

    Callers never modify what they get (deltas are computed into the checkpoint's
    tensor), so one tensor serves every member that needs it. Safe to share between
    the threads that compute members' contributions at once (`randes.hashio.ahead`): a
    tensor two of them ask for together is read once, the other waits for it.
    """

    def __init__(self, base: TensorSource, budget: int) -> None:
        self._base = base
        self._budget = budget
        self._held: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._reading: dict[str, Future[torch.Tensor]] = {}

    def get(self, name: str) -> torch.Tensor:
        with self._lock:
            tensor = self._held.get(name)
            if tensor is not None:
                self._held.move_to_end(name)
                return tensor
            reading = self._reading.get(name)
            mine = reading is None
            if reading is None:
                reading = self._reading[name] = Future()
        if not mine:
            return reading.result()
        try:
            tensor = self._base.get(name)
        except BaseException as exc:
            with self._lock:
                del self._reading[name]
            reading.set_exception(exc)
            raise
        with self._lock:
            self._keep(name, tensor)
            del self._reading[name]
        reading.set_result(tensor)
        return tensor

    def _keep(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if size <= self._budget:
            while self._held and self._bytes + size > self._budget:
                _, dropped = self._held.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
            self._held[name] = tensor
            self._bytes += size


class Contributor:
    """One accepted member of a pass: what it adds to each slot, and its errors."""

    def __init__(self, index: int) -> None:
        self.index = index

    def compute(
        self, slot: str, base: BaseTensors, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, float | None]:
        """This member's float32 value for ``slot`` (fresh: the caller adds into it) and
        the norm of the delta it holds (None: none). Changes nothing of the member, so
        it runs on helper threads, for several slots at once; `take` records it."""
        raise NotImplementedError

    def take(self, slot: str, computed: tuple[torch.Tensor, float | None]) -> torch.Tensor:
        """The value of a `compute` result, its norm recorded (in the caller's order)."""
        return computed[0]

    def contribution(self, slot: str, base: BaseTensors, shape: tuple[int, ...]) -> torch.Tensor:
        """`compute` and `take` in one call."""
        return self.take(slot, self.compute(slot, base, shape))

    def guard(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn``, blaming this member for a checkpoint error it raises."""
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            raise MemberFailed(self.index, exc) from exc


class Member(Contributor):
    """A checkpoint member: its reconciliation, its map, its private output."""

    def __init__(self, index: int, seed: int, rec: Reconciled, layout: Layout) -> None:
        super().__init__(index)
        self.rec = rec
        self.transform = TaskTransform(layout, seed)
        self.delta_norms: dict[str, float] = {}
        self.private_of: dict[str, str | None] = {}
        self.writer: ShardWriter | None = None

    def plan_private(self, base: BaseTensors, layout: Layout) -> None:
        """Which tensors this task stores verbatim (as randes.fold.fold decides): the
        base's private-policy tensors, its extras, and the non-float buffers that
        differ from the base's (compared here, one buffer at a time)."""
        rec, key_map = self.rec, self.rec.key_map
        for source in sorted(n for n in layout.private_base if n not in rec.absent):
            self.private_of[key_map.to_checkpoint(source)] = source
        for source in (n for n in rec.buffers if n in layout.non_float):
            ck_name = key_map.to_checkpoint(source)
            if not torch.equal(self.guard(rec.source.get, ck_name), base.get(source)):
                self.private_of[ck_name] = source
        self.private_of.update(dict.fromkeys(rec.extras))

    def open_writer(self, out_dir: Path, config: TransformConfig) -> ShardWriter:
        self.writer = ShardWriter(
            out_dir,
            max_shard_bytes=config.max_shard_bytes,
            plan=[TensorSpec.of(n, self.rec.source.meta(n)) for n in self.private_of],
        )
        return self.writer

    def compute(
        self, slot: str, base: BaseTensors, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, float | None]:
        """T_t(delta) at ``slot`` in float32: the delta of the source this task's layer
        shuffle puts there (read, and hashed by a recording reader), scrambled, with its
        norm; zeros where the fine-tune lacks that tensor."""
        source = self.transform.source_of(slot)
        if source in self.rec.absent:  # no delta: this task leaves the slot as it was
            return torch.zeros(shape, dtype=torch.float32), None
        ck_name = self.rec.key_map.to_checkpoint(source)
        tuned = self.guard(self.rec.source.get, ck_name)
        value, norm = self.guard(owned_delta, self.rec.source, ck_name, base.get(source), tuned)
        return self.transform.scramble_one(source, value, inplace=True), norm

    def take(self, slot: str, computed: tuple[torch.Tensor, float | None]) -> torch.Tensor:
        value, norm = computed
        if norm is not None:
            self.delta_norms[self.transform.source_of(slot)] = norm
        return value

    def write_private(self, base: BaseTensors, layout: Layout, ticks: Ticks) -> ShardWriter:
        """Read, check and write this task's private tensors (their delta norms too)."""
        assert self.writer is not None
        for ck_name in self.writer.order:
            base_name = self.private_of[ck_name]
            value = self.guard(self.rec.source.get, ck_name)
            if base_name is None:
                self.guard(check_finite, ck_name, value)
            elif base_name in layout.private_base:
                _, self.delta_norms[base_name] = self.guard(
                    _delta, ck_name, value, base.get(base_name)
                )
            self.writer.add(ck_name, value)
            del value
            ticks.tick()
        return self.writer

    def fold(self, private: list[WrittenShard]) -> MemberFold:
        return MemberFold(private=private, key_map=self.rec.key_map, delta_norms=self.delta_norms)


class Partial(Contributor):
    """A member scrambled elsewhere (`scramble_task`): its slots are read, not computed."""

    def __init__(self, index: int, partial: ScrambledPartial) -> None:
        super().__init__(index)
        self.partial = partial

    def compute(
        self, slot: str, base: BaseTensors, shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, float | None]:
        value = self.guard(self.partial.delta.get, slot)
        if value.dtype != torch.float32 or tuple(value.shape) != shape:
            raise MemberFailed(
                self.index,
                IncompatibleCheckpointError(
                    f"scrambled delta slot {slot!r}: {value.dtype}{list(value.shape)}, "
                    f"expected torch.float32{list(shape)}"
                ),
            )
        return value, None


class Ticks:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


@dataclass(frozen=True)
class ScrambledPartial:
    """One task's scrambled delta, computed apart (`scramble_task`) and read back:
    float32 slots in the superposition's layout, plus the parts of its task entry."""

    delta: TensorSource
    fold: MemberFold
