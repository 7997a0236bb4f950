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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from randes.adapters import SourceKind, task_side_files
from randes.checkpoint import CheckpointReader
from randes.config import stored_config
from randes.digests import source_digests
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.fold_batch import MemberFold, ScrambledPartial, fold_scrambled, scramble_task
from randes.manifest import KeyMap, ShardRef, TaskEntry
from storage.batch import TRANSIENT, BatchItem, BatchOutcome
from storage.commit import (
    AddTask,
    Change,
    NoChange,
    Parent,
    Upload,
    commit,
    lease_keys,
    release,
    upload,
)
from storage.folding import FoldOutcome, Progress, ledger_hit
from storage.gc import delete_unclaimed
from storage.readers import open_refs, open_superposition
from storage.registry import TaskExistsError
from storage.sources import resolve_source
from storage.wiring import Wiring
from storage.workdirs import work_dir

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


def scramble_to_store(w: Wiring, bundle: str, item: BatchItem, seed: int, owner: str) -> MapResult:
    """The map step for one checkpoint (see the module docstring).

    A checkpoint error is a refusal (returned, so one bad checkpoint fails nothing
    else); an outage of the store or the registry raises, for the task's retries.
    """
    bundle_rec = w.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    try:
        resolved = resolve_source(item.source, settings=w.settings)
        with contextlib.ExitStack() as stack:
            checkpoint: CheckpointReader = stack.enter_context(resolved.open())
            base = stack.enter_context(w.open_base(bundle_rec.base_name))
            check_compatible(base, checkpoint)  # headers first: a refusal costs no hash
            digests = source_digests(checkpoint)
            hit = ledger_hit(w.registry, bundle, digests.all)
            if hit is not None:
                task, version = hit
                return MapResult(item.task, skipped=FoldOutcome(bundle, task, version, True))
            work = stack.enter_context(work_dir(w.work_root))
            scrambled = scramble_task(
                base=base, checkpoint=checkpoint, seed=seed, config=config, out_dir=work
            )
            kind, side = task_side_files(checkpoint)
            hashed = {checkpoint.side_files[n]: sha for n, sha in checkpoint.side_sha256.items()}
            delta = [Upload.of_shard(s) for s in scrambled.delta]
            private = [Upload.of_shard(s) for s in scrambled.fold.private]
            files = {n: Upload.of_file(p, sha=hashed.get(p)) for n, p in side.items()}
            stored = [*delta, *private, *files.values()]
            lease_keys(w.registry, [u.ref.key for u in stored], owner)
            for one in stored:
                upload(w.store, one)
            refs = {n: u.ref for n, u in files.items()}
            if kind == "peft-lora":  # materializes as the merged model: the base's config
                refs = {**w.base_manifest(bundle_rec.base_name).files, **refs}
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
                    delta=[u.ref for u in delta],
                    private=[u.ref for u in private],
                    files=refs,
                ),
            )
    except RandesError as exc:
        if isinstance(exc, TRANSIENT):
            raise
        return MapResult(item.task, refused=_first_line(exc))


def reduce_partials(
    w: Wiring,
    bundle: str,
    partials: Sequence[PartialRef],
    *,
    progress: Progress | None = None,
) -> BatchOutcome:
    """The reduce step: add ``partials`` (in order) to the head and commit one version.

    The ledger and the bundle's task names are checked again on the head the version
    is built on (another run may have folded the same checkpoint meanwhile); a lost
    race adds the same deltas again on the new head (`storage.commit.commit`). The
    private tensors and side files the entries reference were stored by the map steps.
    """
    bundle_rec = w.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    outcome = BatchOutcome(bundle)
    folded: list[PartialRef] = []

    def build(parent: Parent, work: Path) -> Change | NoChange:
        outcome.skipped, outcome.refused = {}, {}
        folded.clear()
        todo: list[PartialRef] = []
        for p in partials:
            hit = ledger_hit(w.registry, bundle, [p.source_sha256])
            if hit is not None:
                outcome.skipped[p.task] = FoldOutcome(bundle, hit[0], hit[1], skipped=True)
            elif any(t.name == p.task for t in parent.tasks):
                outcome.refused[p.task] = TaskExistsError(bundle, p.task)
            else:
                todo.append(p)
        if not todo:
            return NoChange("", parent.version)
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(w.open_base(bundle_rec.base_name))
            parent_reader = stack.enter_context(open_superposition(w.files, parent.manifest))
            readers: list[CheckpointReader] = []
            for p in todo:
                reader = stack.enter_context(open_refs(w.files, p.delta, f"delta of {p.task}"))
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
        folded.extend(todo[i] for i in result.folded)
        if not folded:
            return NoChange("", parent.version)
        return Change(
            superposition=tuple(Upload.of_shard(s) for s in result.superposition),
            serving=tuple(Upload.of_shard(s) for s in result.serving),
            add=tuple(
                AddTask(_entry(p, parent.next_version), ledger=(p.source_sha256,)) for p in folded
            ),
        )

    done = commit(w.store, w.registry, bundle, build, work_root=w.work_root)
    outcome.attempts = done.attempts
    if done.record is not None:
        outcome.version = done.record.version
        outcome.folded = [
            FoldOutcome(bundle, p.task, done.record.version, seed=p.seed, attempts=done.attempts)
            for p in folded
        ]
    return outcome


def drop_partials(w: Wiring, partials: Sequence[PartialRef], owner: str) -> None:
    """After the reduce: release the run's leases and delete the deltas (through gc's
    announcement protocol, so an object something else claims is kept)."""
    release(w.registry, owner)
    refs = [ref for p in partials for ref in p.delta]
    for ref in refs:  # the reduce's local copies
        w.cache.evict(ref)
    keys = sorted({ref.key for ref in refs})
    try:
        delete_unclaimed(w, keys)
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
