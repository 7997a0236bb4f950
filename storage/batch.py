"""Fold K checkpoints into a bundle as ONE new version (randes.fold_batch underneath).

What a run of `Workspace.fold` per checkpoint would give, in one pass over the master
instead of K: the same tasks, seeds drawn the same way, ledger rows, key maps and
delta norms, and the master bytes K sequential folds with those seeds write. Only the
version numbers differ: one new version records every task the batch added.

Each source is checked on its own and a bad one never blocks the others: a source
that cannot be resolved or opened, whose headers the base refuses, whose data holds
NaN/Inf, or whose task name the bundle already holds is refused with its reason; one
already in the ledger (or twice in the batch) is skipped, as a sequential fold would
report it. Headers are checked before anything is hashed, as for one fold.

Each checkpoint is read once, as for one fold: it is hashed while the pass folds it
(`randes.digests.read_digests`), and the ledger and the repeats within the batch are
checked on those digests afterwards. A checkpoint found there after all (the same bytes
under a new task name or path) or changed while it was read leaves the batch, and the
pass is run again without it, its digest known (rare: it costs a second pass). Only a
checkpoint whose task name the bundle already holds is hashed before, alone: the
ledger then decides between a no-op and a refusal, and nothing needs folding.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from randes.adapters import SourceKind, task_side_files
from randes.checkpoint import CheckpointReader
from randes.config import stored_config
from randes.digests import SourceDigests, read_digests, source_digests
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.fold_batch import BatchFoldResult, BatchMember, MemberFold, fold_batch
from randes.manifest import BaseManifest, TaskEntry
from randes.names import validate_name
from randes.rng import new_task_seed
from storage.cache import file_sha256
from storage.commit import AddTask, Change, NoChange, Parent, Upload, commit
from storage.errors import StoreUnavailableError
from storage.folding import FoldOutcome, Progress, check_scale, ledger_hit
from storage.readers import open_base, open_superposition
from storage.registry import BundleRecord, DatabaseUnavailableError, Registry, TaskExistsError
from storage.sources import ResolvedSource, resolve_source
from storage.wiring import Wiring

log = logging.getLogger(__name__)

TRANSIENT = (StoreUnavailableError, DatabaseUnavailableError)
"""Outages are nobody's checkpoint: they stop the batch (a retry resumes it)."""


class BatchRefusedError(RandesError):
    """Some checkpoints of a batch were refused; the others were folded."""


@dataclass(frozen=True)
class BatchItem:
    """One checkpoint of a batch: where it is, the task it becomes, its lambda."""

    source: str
    task: str
    scale: float | None = None


@dataclass
class BatchOutcome:
    """What a batch did: one new ``version`` (None when nothing was folded)."""

    bundle: str
    version: int | None = None
    folded: list[FoldOutcome] = field(default_factory=list)
    skipped: dict[str, FoldOutcome] = field(default_factory=dict)
    """Task asked for -> where its checkpoint already is (the ledger, or earlier in the
    batch): the outcome's ``task`` names the task that holds it, ``version`` the version
    it entered."""
    refused: dict[str, RandesError] = field(default_factory=dict)
    """Task -> why its checkpoint was not folded (one line each)."""
    attempts: int = 1


@dataclass(eq=False)
class _Source:
    """A checkpoint of the batch, opened and header-checked; its digests once known."""

    item: BatchItem
    resolved: ResolvedSource
    reader: CheckpointReader
    kind: SourceKind
    side: dict[str, Path]
    digests: SourceDigests | None = None

    @property
    def digest(self) -> str:
        assert self.digests is not None
        return self.digests.content


def fold_many(
    w: Wiring,
    bundle: str,
    items: Sequence[BatchItem],
    *,
    progress: Progress | None = None,
) -> BatchOutcome:
    """Fold every item into ``bundle`` as one new version; see the module docstring.

    Bad input of the call itself (a task named twice, an invalid name or scale, an
    unknown bundle) raises before anything is read; a bad checkpoint is refused. The
    version is made by `storage.commit.commit`, which builds it again on a newer head
    when another writer won the race.
    """
    names = [validate_name(item.task, "task name") for item in items]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise RandesError(f"task {twice[0]!r} is named twice in one batch")
    for item in items:
        check_scale(item.scale)
    bundle_rec = w.registry.get_bundle(bundle)
    outcome = BatchOutcome(bundle)
    opening: dict[str, RandesError] = {}
    repeats: list[tuple[_Source, _Source]] = []
    folded: list[tuple[str, int]] = []  # (task, seed) of the last build
    with contextlib.ExitStack() as stack:
        sources = _open_sources(w, bundle_rec, items, stack, opening)

        def build(parent: Parent, work: Path) -> Change | NoChange:
            outcome.refused = dict(opening)
            legacy = w.registry.holds_file_digests(bundle)
            live = {t.name for t in parent.tasks}
            _hash_alone(
                [s for s in sources if s.digests is None and s.item.task in live],
                legacy,
                outcome.refused,
            )
            usable = [s for s in sources if s.item.task not in outcome.refused]
            todo, found = _not_yet_folded(w.registry, bundle, usable, outcome)
            repeats[:] = found
            folded.clear()
            for src in [s for s in todo if s.item.task in live]:
                outcome.refused[src.item.task] = TaskExistsError(bundle, src.item.task)
                todo.remove(src)
            seeds = dict(zip(todo, fresh_seeds(w.registry, bundle, len(todo)), strict=True))
            attempt = 0
            while True:
                if not todo:
                    return NoChange("", parent.version)
                attempt += 1
                result = _fold_pass(
                    w, bundle_rec, parent, work / f"pass{attempt}", todo, seeds, progress
                )
                for index, error in result.refused.items():
                    outcome.refused[todo[index].item.task] = error
                kept = [todo[i] for i in result.folded]
                left = _check_after_pass(w.registry, bundle, kept, legacy, outcome, repeats)
                if left == kept:  # every member folded stays: this pass is the change
                    return _change(w, bundle_rec, parent, result, todo, seeds, folded)
                todo = left  # digests known now: the next pass checks them as it reads

        done = commit(w.store, w.registry, bundle, build, work_root=w.work_root, cache=w.cache)
    outcome.attempts = done.attempts
    if done.record is not None:
        version = done.record.version
        outcome.version = version
        outcome.folded = [
            FoldOutcome(bundle, task, version, seed=seed, attempts=done.attempts)
            for task, seed in folded
        ]
    _report_repeats(outcome, repeats, outcome.version)
    order = {item.task: i for i, item in enumerate(items)}
    outcome.refused = dict(sorted(outcome.refused.items(), key=lambda kv: order[kv[0]]))
    return outcome


def _open_sources(
    w: Wiring,
    bundle_rec: BundleRecord,
    items: Sequence[BatchItem],
    stack: contextlib.ExitStack,
    refused: dict[str, RandesError],
) -> list[_Source]:
    """Resolve, open and check the headers of every item; refusals recorded.

    Headers first, for all: a checkpoint they refuse is never read (cost: nothing,
    whatever its size)."""
    sources: list[_Source] = []
    with w.open_base(bundle_rec.base_name) as base:
        for item in items:
            try:
                resolved = resolve_source(item.source, settings=w.settings)
                reader = stack.enter_context(resolved.open())
                check_compatible(base, reader)
                kind, side = task_side_files(reader)
            except TRANSIENT:
                raise
            except RandesError as exc:
                refused[item.task] = exc
                continue
            sources.append(_Source(item, resolved, reader, kind, side))
    return sources


def _hash_alone(sources: list[_Source], legacy: bool, refused: dict[str, RandesError]) -> None:
    """Hash ``sources`` before any fold (their task names are taken: the ledger alone
    decides), in parallel threads (hashlib and file reads release the GIL)."""
    if not sources:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        hashed = list(pool.map(lambda s: _digests_or_error(s.reader, legacy), sources))
    for src, digests in zip(sources, hashed, strict=True):
        if isinstance(digests, RandesError):
            refused[src.item.task] = digests
        else:
            src.digests = digests


def _digests_or_error(reader: CheckpointReader, legacy: bool) -> SourceDigests | RandesError:
    try:
        return source_digests(reader, legacy=legacy)
    except TRANSIENT:
        raise
    except RandesError as exc:
        return exc


def _check_after_pass(
    registry: Registry,
    bundle: str,
    kept: list[_Source],
    legacy: bool,
    outcome: BatchOutcome,
    repeats: list[tuple[_Source, _Source]],
) -> list[_Source]:
    """The members a pass folded that stay in the batch, their digests now known: a
    member whose files changed while they were read is refused, one the ledger holds
    is skipped, a repeat of an earlier member skipped as it (`_report_repeats`)."""
    left: list[_Source] = []
    first: dict[str, _Source] = {}
    for src in kept:
        try:
            if src.digests is None:
                src.digests = read_digests(src.reader, legacy=legacy)
            else:
                src.reader.check_unchanged()
        except TRANSIENT:
            raise
        except RandesError as exc:
            outcome.refused[src.item.task] = exc
            continue
        if _is_new(registry, bundle, src, first, outcome, repeats):
            left.append(src)
    return left


def _is_new(
    registry: Registry,
    bundle: str,
    src: _Source,
    first: dict[str, _Source],
    outcome: BatchOutcome,
    repeats: list[tuple[_Source, _Source]],
) -> bool:
    """Whether a hashed source is neither in the ledger (then recorded as skipped) nor a
    repeat of an earlier source of this batch (then paired with it in ``repeats``);
    ``first`` maps the digests seen so far to their source."""
    assert src.digests is not None
    hit = ledger_hit(registry, bundle, src.digests.all)
    if hit is not None:
        outcome.skipped[src.item.task] = FoldOutcome(bundle, hit[0], hit[1], skipped=True)
        return False
    twin = next((first[d] for d in src.digests.all if d in first), None)
    if twin is not None:
        repeats.append((src, twin))
        return False
    first.update(dict.fromkeys(src.digests.all, src))
    return True


def _not_yet_folded(
    registry: Registry, bundle: str, sources: list[_Source], outcome: BatchOutcome
) -> tuple[list[_Source], list[tuple[_Source, _Source]]]:
    """The sources the ledger does not hold, and (repeat, first) pairs of one checkpoint
    given twice; sources in the ledger recorded as skipped, as a fold reports them.
    Sources not hashed yet pass (`_check_after_pass` checks them)."""
    outcome.skipped = {}
    todo: list[_Source] = []
    repeats: list[tuple[_Source, _Source]] = []
    first: dict[str, _Source] = {}
    for src in sources:
        # a source not hashed yet is hashed as the pass reads it, and checked after it
        if src.digests is None or _is_new(registry, bundle, src, first, outcome, repeats):
            todo.append(src)
    return todo, repeats


def _report_repeats(
    outcome: BatchOutcome, repeats: list[tuple[_Source, _Source]], version: int | None
) -> None:
    """A checkpoint given twice: the repeat is skipped as the first's task when that
    one was folded (what a sequential fold of the repeat would find in the ledger),
    refused for the same reason when it was refused."""
    for src, twin in repeats:
        error = outcome.refused.get(twin.item.task)
        if error is not None:
            outcome.refused[src.item.task] = error
        elif version is not None:
            outcome.skipped[src.item.task] = FoldOutcome(
                outcome.bundle, twin.item.task, version, skipped=True
            )


def fresh_seeds(registry: Registry, bundle: str, n: int) -> list[int]:
    """``n`` distinct seeds no task of ``bundle`` ever had (as one fold draws its own)."""
    used = set(registry.used_seeds(bundle))
    seeds: list[int] = []
    while len(seeds) < n:
        seed = new_task_seed()
        if seed not in used:
            used.add(seed)
            seeds.append(seed)
    return seeds


def _fold_pass(
    w: Wiring,
    bundle_rec: BundleRecord,
    parent: Parent,
    work: Path,
    todo: list[_Source],
    seeds: dict[_Source, int],
    progress: Progress | None,
) -> BatchFoldResult:
    """``todo`` folded on ``parent`` in one pass (randes.fold_batch: members whose data
    is refused are left out); checkpoints not hashed yet are hashed as they are read."""
    for src in todo:
        if src.digests is None:
            src.reader.record()
    with (
        open_base(w.files, w.base_manifest(bundle_rec.base_name)) as base,
        open_superposition(w.files, parent.manifest) as parent_reader,
    ):
        return fold_batch(
            base=base,
            members=[BatchMember(s.reader, seeds[s]) for s in todo],
            parent=parent_reader,
            config=stored_config(bundle_rec.transform),
            out_dir=work,
            progress=progress,
        )


def _change(
    w: Wiring,
    bundle_rec: BundleRecord,
    parent: Parent,
    result: BatchFoldResult,
    todo: list[_Source],
    seeds: dict[_Source, int],
    folded: list[tuple[str, int]],
) -> Change | NoChange:
    """The change of a pass whose members all stay (NoChange when none was folded)."""
    if not result.folded:
        return NoChange("", parent.version)
    base_manifest = w.base_manifest(bundle_rec.base_name)
    adds: list[AddTask] = []
    uploads: list[Upload] = []
    for index, member in result.folded.items():
        src = todo[index]
        entry, more = _task_entry(base_manifest, src, member, seeds[src], parent.next_version)
        adds.append(AddTask(entry, ledger=(src.digest,)))
        uploads += more
        folded.append((src.item.task, seeds[src]))
    return Change(
        superposition=tuple(Upload.of_shard(s) for s in result.superposition),
        serving=tuple(Upload.of_shard(s) for s in result.serving),
        add=tuple(adds),
        uploads=tuple(uploads),
    )


def _task_entry(
    base: BaseManifest, src: _Source, member: MemberFold, seed: int, version: int
) -> tuple[TaskEntry, list[Upload]]:
    """The manifest entry of one folded member, and the objects it references."""
    private = [Upload.of_shard(s) for s in member.private]
    reader = src.reader
    hashed = {reader.side_files[n]: sha for n, sha in reader.side_sha256.items()}
    side = {n: Upload.of_file(p, sha=hashed.get(p) or file_sha256(p)) for n, p in src.side.items()}
    entry = TaskEntry(
        name=src.item.task,
        seed=seed,
        source_uri=src.resolved.uri,
        source_sha256=src.digest,
        added_in_version=version,
        scale=src.item.scale,
        key_map=member.key_map,
        delta_norms=member.delta_norms,
        private=[u.ref for u in private],
        files={
            # an adapter materializes as the merged model: the base's config, the
            # adapter's tokenizer files
            **(base.files if src.kind == "peft-lora" else {}),
            **{n: u.ref for n, u in side.items()},
        },
        source_kind=src.kind,
        weights_dir=src.reader.weights_dir,
    )
    return entry, [*private, *side.values()]
