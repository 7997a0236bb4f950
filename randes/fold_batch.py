"""Folding K checkpoints into a superposition in one pass over the master.

    S_new[slot] = (((S_parent[slot] + T_1 delta_1) + T_2 delta_2) + ... + T_K delta_K)

K sequential folds (randes.fold.fold) each read the whole parent superposition and write
a whole new one plus its serving copy: K passes over the master. A batch reads base and
parent once, each checkpoint once, and writes the new master and its serving copy once,
each task's private tensors into its own directory. Ingestion (K new checkpoints per
scheduled run) is the user: the master's read + write + quantization are paid once
instead of K times.

The result is the sequential result to the byte: every slot is accumulated in the
order of the members, with the same float32 operations and the same rounding to the
bundle dtype after each member as the sequential folds (each writes its sum in that
dtype, the next reads it back), the same overflow check after each member, the same
per-task key maps, private tensors and delta norms.

A member is refused without blocking the others. Headers are checked first for all of
them (randes.keymap, as a single fold does) and a refused one never enters the pass. A
member whose data fails the pass (NaN/Inf in its tensors, an overflow of the bundle
dtype after its addition, bytes that changed since they were hashed) is refused and the
pass is run again without it: the outputs so far are deleted, so what a batch returns
is always what the sequential folds of the accepted members give. (When two members
overflow a slot together, sequential folds may refuse a different one of them than
the batch does, which refuses the first whose addition overflows.)

Errors of the base, the parent or the outputs (a full disk) are nobody's checkpoint:
they propagate, and everything written is deleted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ParamSpec, TypeVar

import torch

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.errors import CheckpointError, IncompatibleCheckpointError
from randes.fold import (
    PRIVATE_DIR,
    SUPERPOSITION_DIR,
    Progress,
    _delta,
    check_compatible,
    check_finite,
    check_superposition,
    check_written,
    layout_of,
    owned_delta,
    superposition_dtype,
)
from randes.keymap import Reconciled
from randes.manifest import KeyMap
from randes.serving import SERVING_DIR, ServingWriter
from randes.transforms import Layout, TaskTransform
from randes.writer import ShardWriter, TensorSpec, WrittenShard

DELTA_DIR = "delta"

P = ParamSpec("P")
R = TypeVar("R")

BASE_CACHE_BYTES = 128 * 2**20
"""Base tensors kept between members: with layer shuffling, the members of one slot
read different base tensors of its layer group, each of them needed again a few slots
later; a small cache saves most of those re-reads at a bounded cost in memory."""


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


@dataclass
class BatchFoldResult:
    """The new superposition and, per member (by index in the batch), its fold or why
    it was refused. With every member refused nothing is written (empty lists)."""

    superposition: list[WrittenShard]
    serving: list[WrittenShard]
    folded: dict[int, MemberFold] = field(default_factory=dict)
    refused: dict[int, CheckpointError] = field(default_factory=dict)


class _MemberFailed(Exception):
    """Internal: member ``index``'s data failed the pass."""

    def __init__(self, index: int, error: CheckpointError) -> None:
        super().__init__(index, error)
        self.index = index
        self.error = error


class _BaseTensors:
    """Base tensors by name, the most recently used kept within a byte budget.

    Callers never modify what they get (deltas are computed into the checkpoint's
    tensor), so one tensor serves every member that needs it.
    """

    def __init__(self, base: CheckpointReader, budget: int) -> None:
        self._base = base
        self._budget = budget
        self._held: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    def get(self, name: str) -> torch.Tensor:
        tensor = self._held.get(name)
        if tensor is not None:
            self._held.move_to_end(name)
            return tensor
        tensor = self._base.get(name)
        size = tensor.numel() * tensor.element_size()
        if size <= self._budget:
            while self._held and self._bytes + size > self._budget:
                _, dropped = self._held.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()
            self._held[name] = tensor
            self._bytes += size
        return tensor


class _Contributor:
    """One accepted member of a pass: what it adds to each slot, and its errors."""

    def __init__(self, index: int) -> None:
        self.index = index

    def contribution(self, slot: str, base: _BaseTensors, shape: tuple[int, ...]) -> torch.Tensor:
        """This member's float32 value for ``slot`` (fresh: the caller adds into it)."""
        raise NotImplementedError

    def guard(self, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn``, blaming this member for a checkpoint error it raises."""
        try:
            return fn(*args, **kwargs)
        except CheckpointError as exc:
            raise _MemberFailed(self.index, exc) from exc


class _Member(_Contributor):
    """A checkpoint member: its reconciliation, its map, its private output."""

    def __init__(self, index: int, seed: int, rec: Reconciled, layout: Layout) -> None:
        super().__init__(index)
        self.rec = rec
        self.transform = TaskTransform(layout, seed)
        self.delta_norms: dict[str, float] = {}
        self.private_of: dict[str, str | None] = {}
        self.writer: ShardWriter | None = None

    def plan_private(self, base: _BaseTensors, layout: Layout) -> None:
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

    def contribution(self, slot: str, base: _BaseTensors, shape: tuple[int, ...]) -> torch.Tensor:
        """T_t(delta) at ``slot`` in float32: the delta of the source this task's layer
        shuffle puts there, scrambled; zeros where the fine-tune lacks that tensor."""
        source = self.transform.source_of(slot)
        if source in self.rec.absent:  # no delta: this task leaves the slot as it was
            return torch.zeros(shape, dtype=torch.float32)
        ck_name = self.rec.key_map.to_checkpoint(source)
        value, self.delta_norms[source] = self.guard(
            owned_delta, self.rec.source, ck_name, base.get(source)
        )
        return self.transform.scramble_one(source, value, inplace=True)

    def write_private(self, base: _BaseTensors, layout: Layout, ticks: _Ticks) -> ShardWriter:
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


class _Partial(_Contributor):
    """A member scrambled elsewhere (`scramble_task`): its slots are read, not computed."""

    def __init__(self, index: int, partial: ScrambledPartial) -> None:
        super().__init__(index)
        self.partial = partial

    def contribution(self, slot: str, base: _BaseTensors, shape: tuple[int, ...]) -> torch.Tensor:
        value = self.guard(self.partial.delta.get, slot)
        if value.dtype != torch.float32 or tuple(value.shape) != shape:
            raise _MemberFailed(
                self.index,
                IncompatibleCheckpointError(
                    f"scrambled delta slot {slot!r}: {value.dtype}{list(value.shape)}, "
                    f"expected torch.float32{list(shape)}"
                ),
            )
        return value


class _Ticks:
    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total, self.done, self.progress = total, 0, progress

    def tick(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)


def fold_batch(
    *,
    base: CheckpointReader,
    members: Sequence[BatchMember],
    parent: CheckpointReader | None,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None = None,
    base_cache_bytes: int = BASE_CACHE_BYTES,
) -> BatchFoldResult:
    """Add every member's scrambled delta to ``parent``, in the members' order.

    Writes ``out_dir/superposition`` (the new master), ``out_dir/serving`` when
    ``config.serving`` is set (quantized from the master as it is written), and each
    accepted member's private tensors under ``out_dir/private/<index>``. The result
    equals ``len(members)`` calls of randes.fold.fold, each on the previous one's
    superposition, byte for byte (see the module docstring for refusals).
    """
    layout = layout_of(base, config)
    if parent is not None:
        check_superposition(base, parent, layout)
    refused: dict[int, CheckpointError] = {}
    accepted: dict[int, Reconciled] = {}
    for index, member in enumerate(members):  # headers first: refused before any read
        try:
            accepted[index] = check_compatible(base, member.checkpoint)
        except CheckpointError as exc:
            refused[index] = exc

    def contributors(keep: Sequence[int]) -> list[_Contributor]:
        return [_Member(i, members[i].seed, accepted[i], layout) for i in keep]

    return _fold_passes(
        base,
        parent,
        list(accepted),
        contributors,
        layout,
        config,
        Path(out_dir),
        progress,
        base_cache_bytes,
        refused,
    )


@dataclass(frozen=True)
class ScrambledPartial:
    """One task's scrambled delta, computed apart (`scramble_task`) and read back:
    float32 slots in the superposition's layout, plus the parts of its task entry."""

    delta: CheckpointReader
    fold: MemberFold


@dataclass
class ScrambledTask:
    """What `scramble_task` wrote: T_t(theta_t - theta_base) slot by slot (``delta``,
    float32) and the task's private tensors, key map and delta norms (``fold``)."""

    delta: list[WrittenShard]
    fold: MemberFold


def scramble_task(
    *,
    base: CheckpointReader,
    checkpoint: CheckpointReader,
    seed: int,
    config: TransformConfig,
    out_dir: Path,
    base_cache_bytes: int = BASE_CACHE_BYTES,
) -> ScrambledTask:
    """The map step of a distributed fold: one task's scrambled delta, not yet added.

    Writes ``out_dir/delta`` (every slot in float32: exactly the value a fold adds to
    the parent's slot) and ``out_dir/private``. `fold_scrambled` then adds such
    partials to a parent in order, giving the bytes `fold_batch` gives. Per-task
    partials (and not sums of several): a sum of deltas rounds differently from
    adding them one at a time, and the sequential bytes are the contract. A checkpoint
    error (headers, NaN/Inf) is raised as such; what was written is deleted.
    """
    out_dir = Path(out_dir)
    layout = layout_of(base, config)
    member = _Member(0, seed, check_compatible(base, checkpoint), layout)
    bases = _BaseTensors(base, base_cache_bytes)
    try:
        member.plan_private(bases, layout)
    except _MemberFailed as failed:
        raise failed.error from None
    writer = ShardWriter(
        out_dir / DELTA_DIR,
        max_shard_bytes=config.max_shard_bytes,
        plan=[TensorSpec(slot, torch.float32, base.meta(slot).shape) for slot in layout.superposed],
    )
    private = member.open_writer(out_dir / PRIVATE_DIR, config)
    try:
        for slot in writer.order:
            writer.add(slot, member.contribution(slot, bases, tuple(base.meta(slot).shape)))
        member.write_private(bases, layout, _Ticks(0, None))
        delta = writer.finish()
        shards = private.finish()
    except BaseException as exc:
        writer.abort()
        private.abort()
        if isinstance(exc, _MemberFailed):
            raise exc.error from None
        raise
    return ScrambledTask(delta=delta, fold=member.fold(shards))


def fold_scrambled(
    *,
    base: CheckpointReader,
    partials: Sequence[ScrambledPartial],
    parent: CheckpointReader | None,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None = None,
) -> BatchFoldResult:
    """The reduce step: add scrambled partials to ``parent`` in their order.

    Only the base's headers are read (for the layout); the parent and each partial
    are read once, the new master and serving copy written once. A partial whose
    addition overflows the bundle dtype is refused and the rest folded (`fold_batch`).
    """
    layout = layout_of(base, config)
    if parent is not None:
        check_superposition(base, parent, layout)

    def contributors(keep: Sequence[int]) -> list[_Contributor]:
        return [_Partial(i, partials[i]) for i in keep]

    return _fold_passes(
        base,
        parent,
        list(range(len(partials))),
        contributors,
        layout,
        config,
        Path(out_dir),
        progress,
        0,
        {},
    )


def _fold_passes(
    base: CheckpointReader,
    parent: CheckpointReader | None,
    keep: list[int],
    contributors: Callable[[Sequence[int]], list[_Contributor]],
    layout: Layout,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None,
    base_cache_bytes: int,
    refused: dict[int, CheckpointError],
) -> BatchFoldResult:
    """Passes until one completes: a member whose data fails is refused, the rest
    folded again (its outputs so far were deleted)."""
    while keep:
        try:
            result = _one_pass(
                base,
                parent,
                contributors(keep),
                layout,
                config,
                out_dir,
                progress,
                base_cache_bytes,
            )
        except _MemberFailed as failed:
            refused[failed.index] = failed.error
            keep = [i for i in keep if i != failed.index]
            continue
        result.refused = dict(sorted(refused.items()))
        return result
    return BatchFoldResult(superposition=[], serving=[], refused=dict(sorted(refused.items())))


def _accumulate(
    slot: str,
    parent: CheckpointReader | None,
    active: list[_Contributor],
    bases: _BaseTensors,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    check: bool,
) -> torch.Tensor:
    """One slot of the new superposition: the sequential folds' operations in their
    order, rounding to the bundle dtype after each member (what its fold writes and
    the next one reads back); with ``check``, each partial sum checked as it is."""
    acc = parent.get(slot) if parent is not None else None
    for contributor in active:
        value = contributor.contribution(slot, bases, shape)
        if acc is not None:
            value = value.add_(acc.to(torch.float32))
        acc = value.to(dtype)
        del value
        if check:
            contributor.guard(check_written, slot, acc)
    assert acc is not None
    return acc


def _one_pass(
    base: CheckpointReader,
    parent: CheckpointReader | None,
    active: list[_Contributor],
    layout: Layout,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None,
    base_cache_bytes: int,
) -> BatchFoldResult:
    """Fold ``active`` in one pass; _MemberFailed (everything written deleted) when a
    member's data is refused."""
    dtype = superposition_dtype(config)
    bases = _BaseTensors(base, base_cache_bytes)
    members = [m for m in active if isinstance(m, _Member)]
    for member in members:
        member.plan_private(bases, layout)
    ticks = _Ticks(len(layout.superposed) + sum(len(m.private_of) for m in members), progress)
    sup_writer = ShardWriter(
        out_dir / SUPERPOSITION_DIR,
        max_shard_bytes=config.max_shard_bytes,
        plan=[TensorSpec(slot, dtype, base.meta(slot).shape) for slot in layout.superposed],
    )
    serving_writer = (
        ServingWriter(
            out_dir / SERVING_DIR,
            scheme=config.serving,
            slots=[(slot, tuple(base.meta(slot).shape)) for slot in sup_writer.order],
            max_shard_bytes=config.max_shard_bytes,
        )
        if config.serving is not None
        else None
    )
    writers: list[ShardWriter | ServingWriter] = [sup_writer]
    if serving_writer is not None:
        writers.append(serving_writer)
    try:
        for member in members:
            writers.append(member.open_writer(out_dir / PRIVATE_DIR / str(member.index), config))
        for slot in sup_writer.order:
            shape = tuple(base.meta(slot).shape)
            acc = _accumulate(slot, parent, active, bases, shape, dtype, check=False)
            if not bool(torch.isfinite(acc).all()):
                # Inf/NaN never turn finite again under addition, so a finite sum had
                # finite partial sums; this one did not: again, checking each member,
                # to refuse the first whose addition overflowed (as its fold would).
                acc = _accumulate(slot, parent, active, bases, shape, dtype, check=True)
            sup_writer.add(slot, acc)
            if serving_writer is not None:
                serving_writer.add(slot, acc)
            del acc
            ticks.tick()
        privates = [m.write_private(bases, layout, ticks) for m in members]
        superposition = sup_writer.finish()
        serving = serving_writer.finish() if serving_writer is not None else []
        folded = {m.index: m.fold(w.finish()) for m, w in zip(members, privates, strict=True)}
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for contributor in active:
        if isinstance(contributor, _Partial):
            folded[contributor.index] = contributor.partial.fold
    return BatchFoldResult(
        superposition=superposition, serving=serving, folded=dict(sorted(folded.items()))
    )
