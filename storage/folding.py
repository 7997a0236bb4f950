"""Fold a checkpoint into a bundle, or fold a task out again: changes for `commit`.

Each operation checks what it can before any work (names, lambda, headers, the ledger),
then hands `storage.commit.commit` a build that computes the new superposition from the
parent it is given, in the work directory it is given. Retries on a newer head, leases,
uploads and the registry transaction are the commit's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from randes.adapters import task_side_files
from randes.config import stored_config
from randes.digests import SourceDigests, read_digests, source_digests
from randes.fold import check_compatible, fold, unfold
from randes.manifest import TaskEntry
from randes.names import validate_name
from randes.rng import new_task_seed
from storage.cache import file_sha256
from storage.commit import AddTask, Change, Committed, NoChange, Parent, Upload, commit
from storage.readers import open_base, open_superposition, open_task_source
from storage.registry import InvalidValueError, Registry, TaskExistsError, TaskNotFoundError
from storage.sources import resolve_source
from storage.wiring import Wiring

Progress = Callable[[int, int], None]

MAX_SCALE = 1000.0
"""Largest lambda accepted: retrieval is theta_base + lambda * delta, and useful lambdas
are near 1; past this a retrieved weight would only hold the noise (or overflow)."""


@dataclass(frozen=True)
class FoldOutcome:
    """What a fold or removal did. ``skipped`` means the source was already ingested."""

    bundle: str
    task: str
    version: int
    skipped: bool = False
    seed: int | None = None
    attempts: int = 1


def fold_checkpoint(
    w: Wiring,
    bundle: str,
    source: str,
    task: str,
    *,
    scale: float | None = None,
    progress: Progress | None = None,
) -> FoldOutcome:
    """Fold one checkpoint into ``bundle`` as ``task``: a new version, or a no-op.

    Folding the same bytes twice (under any task name) is a no-op reported as
    skipped; a lost race for the next version number rebuilds on the new head.
    """
    validate_name(task, "task name")
    check_scale(scale)
    bundle_rec = w.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    resolved = resolve_source(source, settings=w.settings)
    with resolved.open() as checkpoint:
        base_manifest = w.base_manifest(bundle_rec.base_name)
        # Headers first: a checkpoint they refuse is never read (cost: nothing,
        # whatever its size).
        with open_base(w.files, base_manifest) as base:
            check_compatible(base, checkpoint)
        known: list[SourceDigests] = []  # the digests, once computed (kept across attempts)
        seeds: list[int] = []

        def build(parent: Parent, work: Path) -> Change | NoChange:
            legacy = w.registry.holds_file_digests(bundle)
            if not known and any(t.name == task for t in parent.tasks):
                # the name is taken: only the ledger can make this a no-op, and no fold
                # is needed to tell (the checkpoint is hashed alone, and pinned)
                known.append(source_digests(checkpoint, legacy=legacy))
            if known:
                hit = ledger_hit(w.registry, bundle, known[0].all)
                if hit is not None:
                    return NoChange(*hit)
            if any(t.name == task for t in parent.tasks):
                raise TaskExistsError(bundle, task)
            seed = fresh_seed(w.registry, bundle)
            seeds.append(seed)
            if not known:
                checkpoint.record()  # hashed as the fold reads it: one pass for both
            with (
                open_base(w.files, w.base_manifest(bundle_rec.base_name)) as base,
                open_superposition(w.files, parent.manifest) as parent_reader,
            ):
                result = fold(
                    base=base,
                    checkpoint=checkpoint,
                    parent=parent_reader,
                    seed=seed,
                    config=config,
                    out_dir=work,
                    progress=progress,
                )
            if not known:
                known.append(read_digests(checkpoint, legacy=legacy))
                hit = ledger_hit(w.registry, bundle, known[0].all)
                if hit is not None:  # the same bytes under another name or path
                    return NoChange(*hit)
            else:
                checkpoint.check_unchanged()
            digests = known[0]
            kind, side = task_side_files(checkpoint)
            hashed = {  # side files hashed with the checkpoint
                checkpoint.side_files[n]: sha for n, sha in checkpoint.side_sha256.items()
            }
            side_uploads = {
                n: Upload.of_file(p, sha=hashed.get(p) or file_sha256(p)) for n, p in side.items()
            }
            private = [Upload.of_shard(s) for s in result.private]
            entry = TaskEntry(
                name=task,
                seed=seed,
                source_uri=resolved.uri,
                source_sha256=digests.content,
                added_in_version=parent.next_version,
                scale=scale,
                key_map=result.key_map,
                delta_norms=result.delta_norms,
                private=[u.ref for u in private],
                files={
                    # an adapter materializes as the merged model: the base's config,
                    # the adapter's tokenizer files
                    **(base_manifest.files if kind == "peft-lora" else {}),
                    **{n: u.ref for n, u in side_uploads.items()},
                },
                source_kind=kind,
                weights_dir=checkpoint.weights_dir,
            )
            return Change(
                superposition=tuple(Upload.of_shard(s) for s in result.superposition),
                serving=tuple(Upload.of_shard(s) for s in result.serving),
                add=(AddTask(entry, ledger=(digests.content,)),),
                uploads=(*private, *side_uploads.values()),
            )

        done = commit(w.store, w.registry, bundle, build, work_root=w.work_root, cache=w.cache)
    return _outcome(bundle, task, done, seeds)


def remove_task(
    w: Wiring, bundle: str, task: str, *, progress: Progress | None = None
) -> FoldOutcome:
    """Fold ``task`` out again: re-fetch its source by uri, check its sha256, subtract."""
    bundle_rec = w.registry.get_bundle(bundle)
    config = stored_config(bundle_rec.transform)
    seeds: list[int] = []

    def build(parent: Parent, work: Path) -> Change | NoChange:
        entry = next((t for t in parent.tasks if t.name == task), None)
        if parent.manifest is None or entry is None:
            removed = removed_in(w.registry, bundle, task)
            if removed is not None:  # a retry of a remove that committed: a no-op
                return NoChange(task, removed)
            raise TaskNotFoundError(bundle, task)
        seeds.append(entry.seed)
        with (
            open_task_source(entry, w.settings) as checkpoint,
            open_base(w.files, w.base_manifest(bundle_rec.base_name)) as base,
            open_superposition(w.files, parent.manifest) as parent_reader,
        ):
            assert parent_reader is not None or not parent.manifest.superposition
            result = unfold(
                base=base,
                checkpoint=checkpoint,
                parent=parent_reader,  # type: ignore[arg-type]
                seed=entry.seed,
                config=config,
                out_dir=work,
                progress=progress,
            )
        if len(parent.tasks) == 1:  # the last task: a version without a superposition
            return Change(remove=(task,))
        return Change(
            superposition=tuple(Upload.of_shard(s) for s in result.superposition),
            serving=tuple(Upload.of_shard(s) for s in result.serving),
            remove=(task,),
        )

    done = commit(w.store, w.registry, bundle, build, work_root=w.work_root, cache=w.cache)
    return _outcome(bundle, task, done, seeds)


def _outcome(bundle: str, task: str, done: Committed, seeds: Sequence[int]) -> FoldOutcome:
    """What a fold or removal reports; ``seeds``: the task's seed in each attempt."""
    if done.skipped is not None:
        skip = done.skipped
        return FoldOutcome(bundle, skip.task, skip.version, skipped=True, attempts=done.attempts)
    assert done.record is not None
    return FoldOutcome(bundle, task, done.record.version, seed=seeds[-1], attempts=done.attempts)


def check_scale(scale: float | None) -> None:
    """A per-task lambda override must be a finite positive number (checked before
    anything is computed or uploaded)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidValueError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0 or scale > MAX_SCALE:
        raise InvalidValueError(
            f"scale must be a finite number greater than 0 and at most {MAX_SCALE:g}, got {scale}"
        )


def ledger_hit(registry: Registry, bundle: str, digests: Sequence[str]) -> tuple[str, int] | None:
    """The ledger row (task, version) of a checkpoint under any of its digests (content
    digest, or the file-bytes digest rows written before content digests held)."""
    for digest in digests:
        hit = registry.ledger_lookup(bundle, digest)
        if hit is not None:
            return hit
    return None


def removed_in(registry: Registry, bundle: str, task: str) -> int | None:
    """The version that removed ``task`` when no live task has that name, else None."""
    records = registry.tasks(bundle, include_removed=True)
    if any(r.name == task and r.removed_in_version is None for r in records):
        return None
    removed = [r.removed_in_version for r in records if r.name == task]
    return max((v for v in removed if v is not None), default=None)


def fresh_seed(registry: Registry, bundle: str) -> int:
    """A new task seed no task of ``bundle`` ever used."""
    used = registry.used_seeds(bundle)
    while True:
        seed = new_task_seed()
        if seed not in used:
            return seed
