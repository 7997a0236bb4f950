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
from randes.digests import SourceDigests, source_digests
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.fold_batch import BatchMember, MemberFold, fold_batch
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


@dataclass
class _Source:
    """A checkpoint of the batch, opened, header-checked and hashed."""

    item: BatchItem
    resolved: ResolvedSource
    reader: CheckpointReader
    digest: str
    digests: tuple[str, ...]
    kind: SourceKind
    side: dict[str, Path]
    side_shas: dict[Path, str]


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
            todo, found = _not_yet_folded(w.registry, bundle, sources, outcome)
            repeats[:] = found
            folded.clear()
            live = {t.name for t in parent.tasks}
            for src in [s for s in todo if s.item.task in live]:
                outcome.refused[src.item.task] = TaskExistsError(bundle, src.item.task)
                todo.remove(src)
            if not todo:
                return NoChange("", parent.version)
            return _build(w, bundle_rec, parent, work, todo, outcome, folded, progress)

        done = commit(
            w.store, w.registry, bundle, build, work_root=w.work_root, cache=w.cache
        )
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
    """Resolve, open, check the headers of, then hash every item; refusals recorded.

    Headers first, for all: a checkpoint they refuse is never hashed (cost: nothing,
    whatever its size); the hash then pins what the fold reads."""
    opened: list[tuple[BatchItem, ResolvedSource, CheckpointReader]] = []
    with w.open_base(bundle_rec.base_name) as base:
        for item in items:
            try:
                resolved = resolve_source(item.source, settings=w.settings)
                reader = stack.enter_context(resolved.open())
                check_compatible(base, reader)
            except TRANSIENT:
                raise
            except RandesError as exc:
                refused[item.task] = exc
                continue
            opened.append((item, resolved, reader))
    # Hashing reads every byte once more (the fold reads them again, checked against
    # it): the checkpoints are independent, and hashlib and file reads release the GIL.
    with ThreadPoolExecutor(max_workers=max(1, min(len(opened), os.cpu_count() or 1))) as pool:
        hashed_all = list(pool.map(_digests_or_error, [reader for _, _, reader in opened]))
    sources: list[_Source] = []
    for (item, resolved, reader), digests in zip(opened, hashed_all, strict=True):
        try:
            if isinstance(digests, RandesError):
                raise digests
            kind, side = task_side_files(reader)
        except RandesError as exc:
            refused[item.task] = exc
            continue
        hashed = {reader.side_files[n]: sha for n, sha in reader.side_sha256.items()}
        sources.append(
            _Source(
                item=item,
                resolved=resolved,
                reader=reader,
                digest=digests.content,
                digests=tuple(digests.all),
                kind=kind,
                side=side,
                side_shas={p: hashed.get(p) or file_sha256(p) for p in side.values()},
            )
        )
    return sources


def _digests_or_error(reader: CheckpointReader) -> SourceDigests | RandesError:
    try:
        return source_digests(reader)
    except TRANSIENT:
        raise
    except RandesError as exc:
        return exc


def _not_yet_folded(
    registry: Registry, bundle: str, sources: list[_Source], outcome: BatchOutcome
) -> tuple[list[_Source], list[tuple[_Source, _Source]]]:
    """The sources the ledger does not hold, and (repeat, first) pairs of one checkpoint
    given twice; sources in the ledger recorded as skipped, as a fold reports them."""
    outcome.skipped = {}
    todo: list[_Source] = []
    repeats: list[tuple[_Source, _Source]] = []
    first: dict[str, _Source] = {}
    for src in sources:
        hit = ledger_hit(registry, bundle, src.digests)
        if hit is not None:
            outcome.skipped[src.item.task] = FoldOutcome(bundle, hit[0], hit[1], skipped=True)
            continue
        twin = next((first[d] for d in src.digests if d in first), None)
        if twin is not None:
            repeats.append((src, twin))
            continue
        first.update(dict.fromkeys(src.digests, src))
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


def _build(
    w: Wiring,
    bundle_rec: BundleRecord,
    parent: Parent,
    work: Path,
    todo: list[_Source],
    outcome: BatchOutcome,
    folded: list[tuple[str, int]],
    progress: Progress | None,
) -> Change | NoChange:
    """One attempt's change: ``todo`` folded on ``parent`` in one pass (members whose
    data is refused recorded in ``outcome``); NoChange when none is left."""
    config = stored_config(bundle_rec.transform)
    seeds = fresh_seeds(w.registry, bundle_rec.name, len(todo))
    base_manifest = w.base_manifest(bundle_rec.base_name)
    with (
        open_base(w.files, base_manifest) as base,
        open_superposition(w.files, parent.manifest) as parent_reader,
    ):
        result = fold_batch(
            base=base,
            members=[BatchMember(s.reader, seed) for s, seed in zip(todo, seeds, strict=True)],
            parent=parent_reader,
            config=config,
            out_dir=work,
            progress=progress,
        )
    for index, error in result.refused.items():
        outcome.refused[todo[index].item.task] = error
    if not result.folded:
        return NoChange("", parent.version)
    adds: list[AddTask] = []
    uploads: list[Upload] = []
    for index, member in result.folded.items():
        src = todo[index]
        entry, more = _task_entry(base_manifest, src, member, seeds[index], parent.next_version)
        adds.append(AddTask(entry, ledger=(src.digest,)))
        uploads += more
        folded.append((src.item.task, seeds[index]))
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
    side = {n: Upload.of_file(p, sha=src.side_shas[p]) for n, p in src.side.items()}
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
