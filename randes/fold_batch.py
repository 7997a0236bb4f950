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
per-task key maps, private tensors and delta norms. What each member adds to a slot
(its tensor read, hashed, subtracted from the base's and scrambled) is computed on two
helper threads, several tensors ahead of the slot being added (`randes.hashio.ahead`,
within ``ahead_bytes`` whatever the number of members); the additions themselves, the
checks and the writes stay on the calling thread, in the members' order.

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

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.errors import CheckpointError
from randes.fold import (
    PRIVATE_DIR,
    Progress,
    all_finite,
    check_compatible,
    check_written,
    open_writers,
)
from randes.fold_members import (
    AHEAD_BYTES,
    BASE_CACHE_BYTES,
    BaseTensors,
    BatchMember,
    Contributor,
    Member,
    MemberFailed,
    MemberFold,
    Partial,
    ScrambledPartial,
    Ticks,
)
from randes.hashio import ahead
from randes.keymap import Reconciled
from randes.layout import Layout, check_superposition, layout_of, superposition_dtype
from randes.serving import ServingWriter
from randes.source import TensorSource
from randes.writer import ShardWriter, TensorSpec, WrittenShard

__all__ = [
    "BatchFoldResult",
    "BatchMember",
    "MemberFold",
    "ScrambledPartial",
    "ScrambledTask",
    "fold_batch",
    "fold_scrambled",
    "scramble_task",
]

DELTA_DIR = "delta"


@dataclass
class BatchFoldResult:
    """The new superposition and, per member (by index in the batch), its fold or why
    it was refused. With every member refused nothing is written (empty lists)."""

    superposition: list[WrittenShard]
    serving: list[WrittenShard]
    folded: dict[int, MemberFold] = field(default_factory=dict)
    refused: dict[int, CheckpointError] = field(default_factory=dict)


def fold_batch(
    *,
    base: TensorSource,
    members: Sequence[BatchMember],
    parent: TensorSource | None,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None = None,
    base_cache_bytes: int = BASE_CACHE_BYTES,
    ahead_bytes: int = AHEAD_BYTES,
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

    def contributors(keep: Sequence[int]) -> list[Contributor]:
        return [Member(i, members[i].seed, accepted[i], layout) for i in keep]

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
        ahead_bytes,
    )


@dataclass
class ScrambledTask:
    """What `scramble_task` wrote: T_t(theta_t - theta_base) slot by slot (``delta``,
    float32) and the task's private tensors, key map and delta norms (``fold``)."""

    delta: list[WrittenShard]
    fold: MemberFold


def scramble_task(
    *,
    base: TensorSource,
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
    member = Member(0, seed, check_compatible(base, checkpoint), layout)
    bases = BaseTensors(base, base_cache_bytes)
    try:
        member.plan_private(bases, layout)
    except MemberFailed as failed:
        raise failed.error from None
    writer = ShardWriter(
        out_dir / DELTA_DIR,
        max_shard_bytes=config.max_shard_bytes,
        plan=[TensorSpec(slot, torch.float32, base.meta(slot).shape) for slot in layout.superposed],
    )
    private = member.open_writer(out_dir / PRIVATE_DIR, config)
    try:
        for slot in writer.order:
            shape = tuple(base.meta(slot).shape)
            writer.add(slot, member.contribution(slot, bases, shape))
        member.write_private(bases, layout, Ticks(0, None))
        delta = writer.finish()
        shards = private.finish()
    except BaseException as exc:
        writer.abort()
        private.abort()
        if isinstance(exc, MemberFailed):
            raise exc.error from None
        raise
    return ScrambledTask(delta=delta, fold=member.fold(shards))


def fold_scrambled(
    *,
    base: TensorSource,
    partials: Sequence[ScrambledPartial],
    parent: TensorSource | None,
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

    def contributors(keep: Sequence[int]) -> list[Contributor]:
        return [Partial(i, partials[i]) for i in keep]

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
        AHEAD_BYTES,
    )


def _fold_passes(
    base: TensorSource,
    parent: TensorSource | None,
    keep: list[int],
    contributors: Callable[[Sequence[int]], list[Contributor]],
    layout: Layout,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None,
    base_cache_bytes: int,
    refused: dict[int, CheckpointError],
    ahead_bytes: int,
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
                ahead_bytes,
            )
        except MemberFailed as failed:
            refused[failed.index] = failed.error
            keep = [i for i in keep if i != failed.index]
            continue
        result.refused = dict(sorted(refused.items()))
        return result
    return BatchFoldResult(superposition=[], serving=[], refused=dict(sorted(refused.items())))


@dataclass(frozen=True)
class _Job:
    """One tensor a pass needs for a slot: the parent's (``contributor`` None) or what
    a member adds to it; ``nbytes``, what its result holds."""

    slot: str
    shape: tuple[int, ...]
    contributor: Contributor | None
    nbytes: int


def _jobs(
    order: Sequence[str],
    base: TensorSource,
    parent: TensorSource | None,
    active: list[Contributor],
) -> Iterator[_Job]:
    """Every tensor of a pass in the order the pass adds them: per slot, the parent's,
    then each member's."""
    for slot in order:
        shape = tuple(base.meta(slot).shape)
        if parent is not None:
            yield _Job(slot, shape, None, parent.meta(slot).nbytes)
        for contributor in active:
            yield _Job(slot, shape, contributor, math.prod(shape) * 4)


def _run(job: _Job, parent: TensorSource | None, bases: BaseTensors) -> Any:
    """A job's result (on a helper thread): the parent's tensor, or `Contributor.compute`."""
    if job.contributor is None:
        assert parent is not None
        return parent.get(job.slot)
    return job.contributor.compute(job.slot, bases, job.shape)


def _accumulate(
    slot: str,
    acc: torch.Tensor | None,
    active: list[Contributor],
    computed: Iterator[tuple[torch.Tensor, float | None]],
    dtype: torch.dtype,
    *,
    check: bool,
) -> torch.Tensor:
    """One slot of the new superposition from the parent's tensor ``acc`` and each
    member's `Contributor.compute` result (``computed``, in the members' order): the
    sequential folds' operations in their order, rounding to the bundle dtype after
    each member (what its fold writes and the next one reads back); with ``check``,
    each partial sum checked as it is."""
    for contributor in active:
        value = contributor.take(slot, next(computed))
        if acc is not None:
            value = value.add_(acc.to(torch.float32))
        acc = value.to(dtype)
        del value
        if check:
            contributor.guard(check_written, slot, acc)
    assert acc is not None
    return acc


def _one_pass(
    base: TensorSource,
    parent: TensorSource | None,
    active: list[Contributor],
    layout: Layout,
    config: TransformConfig,
    out_dir: Path,
    progress: Progress | None,
    base_cache_bytes: int,
    ahead_bytes: int,
) -> BatchFoldResult:
    """Fold ``active`` in one pass; MemberFailed (everything written deleted) when a
    member's data is refused."""
    dtype = superposition_dtype(config)
    bases = BaseTensors(base, base_cache_bytes)
    members = [m for m in active if isinstance(m, Member)]
    for member in members:
        member.plan_private(bases, layout)
    ticks = Ticks(len(layout.superposed) + sum(len(m.private_of) for m in members), progress)
    sup_writer, serving_writer = open_writers(base, layout, config, out_dir)
    writers: list[ShardWriter | ServingWriter] = [sup_writer]
    if serving_writer is not None:
        writers.append(serving_writer)
    try:
        for member in members:
            writers.append(member.open_writer(out_dir / PRIVATE_DIR / str(member.index), config))
        # every member's tensors read, hashed and scrambled on helper threads, several
        # ahead (within ahead_bytes), while this thread adds and writes
        results = ahead(
            functools.partial(_run, parent=parent, bases=bases),
            _jobs(sup_writer.order, base, parent, active),
            cost=lambda job: job.nbytes,
            budget=ahead_bytes,
        )
        try:
            for slot in sup_writer.order:
                acc = next(results) if parent is not None else None
                acc = _accumulate(slot, acc, active, results, dtype, check=False)
                if not all_finite(acc):
                    # Inf/NaN never turn finite again under addition, so a finite sum had
                    # finite partial sums; this one did not: again, checking each member,
                    # to refuse the first whose addition overflowed (as its fold would).
                    shape = tuple(base.meta(slot).shape)
                    again = (c.compute(slot, bases, shape) for c in active)
                    acc = parent.get(slot) if parent is not None else None
                    acc = _accumulate(slot, acc, active, again, dtype, check=True)
                sup_writer.add(slot, acc)
                if serving_writer is not None:
                    serving_writer.add(slot, acc)
                del acc
                ticks.tick()
        finally:
            results.close()  # the reads under way finish first
        privates = [m.write_private(bases, layout, ticks) for m in members]
        superposition = sup_writer.finish()
        serving = serving_writer.finish() if serving_writer is not None else []
        folded = {m.index: m.fold(w.finish()) for m, w in zip(members, privates, strict=True)}
    except BaseException:
        for writer in writers:
            writer.abort()
        raise
    for contributor in active:
        if isinstance(contributor, Partial):
            folded[contributor.index] = contributor.partial.fold
    return BatchFoldResult(
        superposition=superposition, serving=serving, folded=dict(sorted(folded.items()))
    )
