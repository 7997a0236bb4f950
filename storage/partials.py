"""A batch fold split in map and reduce steps that run on different machines.

The map step (`scramble_to_store`, one per checkpoint, on any worker that reaches the
store and the registry) fetches a checkpoint, checks it against the base, hashes it,
and writes its scrambled delta T_t(theta_t - theta_base) (float32, the superposition's
layout) and its private tensors to the store as content-addressed objects. The reduce
step (`reduce_partials`, once) adds the deltas to the head's superposition in the
checkpoints' order, which gives the bytes of sequential folds (randes.fold_batch), and
commits one version.

A partial is one task's delta, not a sum of several: adding a sum rounds differently
from adding its terms one by one, and sequential bytes are the contract. The deltas
do not depend on the parent, so a reduce that lost the race for the next version
simply adds them again on the new head.

Every object a map step writes is leased by the run's ``owner`` before it is uploaded
(so `gc` keeps it while the run lives) and referenced by no version: the deltas are
deleted after the commit, and if the run dies its leases expire and `gc` reclaims
them like any unreferenced object.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from randes.adapters import SourceKind, task_side_files
from randes.checkpoint import CheckpointReader
from randes.config import stored_config
from randes.digests import source_digests
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.fold_batch import MemberFold, ScrambledPartial, fold_scrambled, scramble_task
from randes.manifest import KeyMap, ShardRef, TaskEntry
from storage.batch import TRANSIENT, BatchItem, BatchOutcome
from storage.cache import file_sha256
from storage.registry import AlreadyIngestedError, NewTask, TaskExistsError, VersionConflictError
from storage.sources import resolve_source
from storage.workspace import (
    MAX_FOLD_ATTEMPTS,
    FoldContentionError,
    FoldOutcome,
    Progress,
    Workspace,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartialRef:
    """One checkpoint scrambled by a map step: where its delta lies in the store, and
    the parts of its task entry. Small and picklable (it travels back from a worker)."""

    task: str
    seed: int
    scale: float | None
    source_uri: str
    source_sha256: str
    source_kind: SourceKind
    weights_dir: str
    key_map: KeyMap
    delta_norms: dict[str, float]
    delta: list[ShardRef]
    private: list[ShardRef]
    files: dict[str, ShardRef]


@dataclass(frozen=True)
class MapResult:
    """A map step's answer for one checkpoint: scrambled, already folded, or refused."""

    task: str
    partial: PartialRef | None = None
    skipped: FoldOutcome | None = None
    refused: str | None = None


def scramble_to_store(
    ws: Workspace, bundle: str, item: BatchItem, seed: int, owner: str
) -> MapResult:
    """The map step for one checkpoint (see the module docstring).

    A checkpoint error is a refusal (returned, so one bad checkpoint fails nothing
    else); an outage of the store or the registry raises, for the task's retries.
    """
    bundle_rec = ws.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    try:
        resolved = resolve_source(item.source, settings=ws.settings)
        with contextlib.ExitStack() as stack:
            checkpoint: CheckpointReader = stack.enter_context(resolved.open())
            base = stack.enter_context(ws._base_reader(bundle_rec))
            check_compatible(base, checkpoint)  # headers first: a refusal costs no hash
            digests = source_digests(checkpoint)
            hit = ws._ledger_hit(bundle, digests.all)
            if hit is not None:
                return MapResult(item.task, skipped=FoldOutcome(bundle, *hit, skipped=True))
            work = stack.enter_context(ws._work_dir())
            scrambled = scramble_task(
                base=base, checkpoint=checkpoint, seed=seed, config=config, out_dir=work
            )
            kind, side = task_side_files(checkpoint)
            hashed = {checkpoint.side_files[n]: sha for n, sha in checkpoint.side_sha256.items()}
            side_shas = {p: hashed.get(p) or file_sha256(p) for p in side.values()}
            ws._lease([*scrambled.delta, *scrambled.fold.private], side_shas, owner)
            files = {n: ws._upload_file(p, [], sha=side_shas[p]) for n, p in side.items()}
            if kind == "peft-lora":  # materializes as the merged model: the base's config
                files = {**ws.base_manifest(bundle_rec.base_name).files, **files}
            return MapResult(
                item.task,
                partial=PartialRef(
                    task=item.task,
                    seed=seed,
                    scale=item.scale,
                    source_uri=resolved.uri,
                    source_sha256=digests.content,
                    source_kind=kind,
                    weights_dir=checkpoint.weights_dir,
                    key_map=scrambled.fold.key_map,
                    delta_norms=scrambled.fold.delta_norms,
                    delta=ws._upload_shards(scrambled.delta),
                    private=ws._upload_shards(scrambled.fold.private),
                    files=files,
                ),
            )
    except RandesError as exc:
        if isinstance(exc, TRANSIENT):
            raise
        return MapResult(item.task, refused=_first_line(exc))


def reduce_partials(
    ws: Workspace,
    bundle: str,
    partials: Sequence[PartialRef],
    *,
    progress: Progress | None = None,
) -> BatchOutcome:
    """The reduce step: add ``partials`` (in order) to the head and commit one version.

    The ledger and the bundle's task names are checked again on the head the version
    is built on (another run may have folded the same checkpoint meanwhile).
    """
    bundle_rec = ws.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    outcome = BatchOutcome(bundle)
    for attempt in range(1, MAX_FOLD_ATTEMPTS + 1):
        outcome.attempts = attempt
        outcome.skipped = {}
        todo: list[PartialRef] = []
        for p in partials:
            hit = ws._ledger_hit(bundle, [p.source_sha256])
            if hit is not None:
                outcome.skipped[p.task] = FoldOutcome(bundle, *hit, skipped=True)
            else:
                todo.append(p)
        head = ws.registry.head(bundle)
        parent = ws.manifest(head) if head is not None else None
        live = {t.name for t in parent.tasks} if parent is not None else set()
        for p in [p for p in todo if p.task in live]:
            outcome.refused[p.task] = TaskExistsError(bundle, p.task)
            todo.remove(p)
        if not todo:
            return outcome
        version = head.version + 1 if head is not None else 1
        owner = uuid.uuid4().hex
        try:
            with contextlib.ExitStack() as stack:
                work = stack.enter_context(ws._work_dir())
                base = stack.enter_context(ws._base_reader(bundle_rec))
                parent_reader = stack.enter_context(ws._superposition_reader(parent))
                readers: list[CheckpointReader] = []
                for p in todo:
                    reader = stack.enter_context(ws._open_refs(p.delta, f"delta of {p.task}"))
                    assert reader is not None  # a layout has at least one superposed slot
                    readers.append(reader)
                result = fold_scrambled(
                    base=base,
                    partials=[
                        ScrambledPartial(reader, MemberFold([], p.key_map, p.delta_norms))
                        for reader, p in zip(readers, todo, strict=True)
                    ],
                    parent=parent_reader,
                    config=config,
                    out_dir=work,
                    progress=progress,
                )
                for index, error in result.refused.items():
                    outcome.refused[todo[index].task] = error
                if not result.folded:
                    return outcome
                folded = [todo[i] for i in result.folded]
                ws._lease([*result.superposition, *result.serving], {}, owner)
                manifest = ws._next_manifest(
                    bundle,
                    bundle_rec,
                    config,
                    head,
                    parent,
                    superposition=ws._upload_shards(result.superposition),
                    tasks=[
                        *(parent.tasks if parent else []),
                        *(_entry(p, version) for p in folded),
                    ],
                    serving=ws._upload_serving(config, result.serving),
                )
                ws._commit(
                    bundle,
                    manifest,
                    owner,
                    added=[NewTask(p.task, p.seed, p.source_uri, p.source_sha256) for p in folded],
                    ledger=[(p.source_sha256, p.task) for p in folded],
                )
        except VersionConflictError:
            log.info("bundle %s: another writer took version %d; adding again", bundle, version)
            continue
        except AlreadyIngestedError:
            continue
        finally:
            ws._release(owner)
        outcome.version = version
        outcome.folded = [
            FoldOutcome(bundle, p.task, version, seed=p.seed, attempts=attempt) for p in folded
        ]
        return outcome
    raise FoldContentionError(
        f"bundle {bundle!r}: lost the race for a new version {MAX_FOLD_ATTEMPTS} times"
    )


def drop_partials(ws: Workspace, partials: Sequence[PartialRef], owner: str) -> None:
    """After the reduce: release the run's leases and delete the deltas (through gc's
    announcement protocol, so an object something else claims is kept)."""
    ws._release(owner)
    refs = [ref for p in partials for ref in p.delta]
    for ref in refs:  # the reduce's local copies
        ws.cache.evict(ref)
    keys = sorted({ref.key for ref in refs})
    try:
        ws._delete_unclaimed(keys)
    except RandesError as exc:  # gc reclaims them later
        log.warning("could not delete %d scrambled deltas now (gc will): %s", len(keys), exc)


def _entry(p: PartialRef, version: int) -> TaskEntry:
    return TaskEntry(
        name=p.task,
        seed=p.seed,
        source_uri=p.source_uri,
        source_sha256=p.source_sha256,
        added_in_version=version,
        scale=p.scale,
        key_map=p.key_map,
        delta_norms=p.delta_norms,
        private=p.private,
        files=p.files,
        source_kind=p.source_kind,
        weights_dir=p.weights_dir,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else repr(exc)
