"""Bundle groups: many bundles of one base, each kept under an interference limit.

A bundle is full when one more task would push some member's relative interference
r_t (randes.capacity) past the group's limit; the task then goes to another bundle of
the group instead of degrading every task already there. `place` chooses that bundle
from stored numbers alone: the new checkpoint's delta norms (one streaming pass, no
writes), each member's head manifest (the delta norms of its tasks) and the base's
norms, then folds through the ordinary `Workspace.fold`. A group's members are named
``<group>-<n>`` and share the group's base, transform and gate.

What is guaranteed, with any number of concurrent placements:

- every fold is an ordinary fold: never lost, never applied twice within a member;
- a new member is created once: two placements that both find the group full race for
  the same position, the database's unique constraint picks one, and the loser places
  again over the members as they are then (the new one may well have room for it);
- sequentially, every member stays within the limit: each placement checks the member
  it chose with the new task included.

What is NOT guaranteed:

- the limit under concurrency: placements that choose the same member from the same
  snapshot each see room for themselves alone, so their folds together may overshoot
  the limit (slightly for small deltas). A placement reports the interference its
  member ended with (`Placement.interference`, `over_limit`) and logs a warning;
- group-wide uniqueness of a task name or a checkpoint is checked against every member
  before folding, not by a constraint: two concurrent placements of the same new name
  (or of the same bytes) can land in two different members. Within one member the
  registry's constraints still refuse both. Run the ingests of one group one at a time
  (the Prefect deployments use ``concurrency_limit: 1``) to rule both out.

Costs and leftovers: a placement reads the checkpoint three times (its digest, its
delta norms, the fold), and a remote source is fetched twice (`Workspace.fold` resolves
it again, so the uri it records is the user's). A member created for a fold that then
fails stays empty, and the next placement uses it. Folding into a member bundle
directly (``randes fold g-2 ...``) bypasses all of this.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from randes import capacity
from randes.config import TransformConfig, stored_config
from randes.digests import source_digests
from randes.errors import RandesError
from randes.fold import check_compatible
from randes.layout import superposed_names
from randes.manifest import BundleManifest
from randes.names import validate_name
from randes.scaling import Norms, data_free_scale, noise_gain
from storage.cache import integrity_context, version_context
from storage.folding import ledger_hit
from storage.localfs import check_destination, reports_full_disk, staged_directory
from storage.pull import pull_versions
from storage.pulled import pointer_json
from storage.registry import (
    AliasNotFoundError,
    BundleRecord,
    GroupMemberConflictError,
    GroupRecord,
    InvalidValueError,
    NotFoundError,
    RegistryError,
    TaskExistsError,
    VersionNotFoundError,
    VersionRecord,
)
from storage.sources import resolve_source
from storage.workspace import FoldOutcome, Progress, Workspace

log = logging.getLogger(__name__)

MAX_PLACEMENT_ATTEMPTS = 20
"""Placements over fresh member lists before giving up when many writers race to grow
one group."""

_DIGITS = re.compile(r"[0-9]+")


class GroupTaskExistsError(RegistryError):
    """A task of that name is already live in one of the group's members."""

    def __init__(self, group: str, task: str, member: str) -> None:
        super().__init__(
            f"bundle group {group!r} already has a task {task!r} (in bundle {member!r})"
        )
        self.group = group
        self.task = task
        self.member = member


class GroupTaskNotFoundError(NotFoundError):
    def __init__(self, group: str, task: str, ref: str | None) -> None:
        at = "at its head" if ref is None else f"at {ref!r}"
        super().__init__(f"no member of bundle group {group!r} holds task {task!r} {at}")
        self.group = group
        self.task = task
        self.ref = ref


class GroupRefNotFoundError(NotFoundError):
    """No member of the group has a version under that reference (or any version)."""

    def __init__(self, group: str, ref: str | None) -> None:
        what = "has a version yet" if ref is None else f"has a version {ref!r}"
        super().__init__(f"no member of bundle group {group!r} {what}")
        self.group = group
        self.ref = ref


class GroupContentionError(RandesError):
    """Too many concurrent placements grew the group under this one."""


@dataclass(frozen=True)
class Placement:
    """Where `place` put a checkpoint. ``outcome.bundle`` is the member."""

    group: str
    outcome: FoldOutcome
    created_member: bool = False
    interference: float | None = None
    """The largest r_t in the member once the fold committed (None when skipped)."""
    over_limit: bool = False
    attempts: int = 1

    @property
    def member(self) -> str:
        return self.outcome.bundle


@dataclass(frozen=True)
class TaskLoad:
    """One task of a member as `show` reports it."""

    name: str
    added_in_version: int
    interference: float
    data_free_scale: float
    scale: float | None


@dataclass(frozen=True)
class MemberLoad:
    bundle: str
    version: int | None
    tasks: list[TaskLoad] = field(default_factory=list)

    @property
    def max_interference(self) -> float:
        return max((t.interference for t in self.tasks), default=0.0)


@dataclass(frozen=True)
class GroupPull:
    group: str
    ref: str | None
    pulled: list[VersionRecord]
    skipped: list[str]
    """Members with no version under the reference (no version yet, or no such alias)."""


# ------------------------------------------------------------------ groups
def create_group(
    ws: Workspace,
    name: str,
    base: str,
    config: TransformConfig,
    *,
    max_interference: float | None = None,
    gate_threshold: float | None = None,
) -> GroupRecord:
    """Create an empty group; its first placement creates its first member.

    ``max_interference`` None: the limit calibrated for the config's sign map."""
    validate_name(name, "group name")
    if max_interference is None:
        max_interference = capacity.default_limit(config.map)
    return ws.registry.create_group(
        name,
        base,
        config.model_dump(mode="json"),
        max_interference=max_interference,
        gate_threshold=gate_threshold,
    )


def member_norms(ws: Workspace, bundle: str) -> dict[str, Norms]:
    """Delta norms of every task at the member's head ({} before its first version)."""
    head = ws.registry.head(bundle)
    return {} if head is None else _norms(ws.manifest(head))


def find_checkpoint(
    ws: Workspace, members: Sequence[BundleRecord], digests: Sequence[str], attempt: int = 1
) -> FoldOutcome | None:
    """Where the group already holds that checkpoint (its ledger in any member, under
    any of its digests), or None."""
    for member in members:
        hit = ledger_hit(ws.registry, member.name, digests)
        if hit is not None:
            return FoldOutcome(member.name, hit[0], hit[1], skipped=True, attempts=attempt)
    return None


def _norms(manifest: BundleManifest) -> dict[str, Norms]:
    return {t.name: t.delta_norms for t in manifest.tasks}


# --------------------------------------------------------------- placement
def place(
    ws: Workspace,
    group: str,
    source: str,
    task: str,
    *,
    scale: float | None = None,
    progress: Progress | None = None,
) -> Placement:
    """Fold ``source`` as ``task`` into the first member with room for it, or a new one.

    A no-op (``outcome.skipped``) when any member already holds the same bytes; refused
    (GroupTaskExistsError) when any member has a live task of that name. See the module
    docstring for what holds under concurrency.
    """
    validate_name(task, "task name")
    g = ws.registry.get_group(group)
    config = stored_config(g.transform)
    resolved = resolve_source(source, settings=ws.settings)
    with resolved.open() as checkpoint, ws.open_base(g.base_name) as base:
        check_compatible(base, checkpoint)  # headers first: a refusal is never hashed
        digests = source_digests(checkpoint)
        digest = digests.content
        if found := find_checkpoint(ws, ws.registry.group_members(group), digests.all):
            return Placement(group, found)
        names = superposed_names(base, config)
        norms = capacity.measure_delta_norms(base, checkpoint, config)
    base_norms = ws.base_manifest(g.base_name).norms

    for attempt in range(1, MAX_PLACEMENT_ATTEMPTS + 1):
        members = ws.registry.group_members(group)
        snapshot: list[dict[str, Norms]] = []
        if (found := find_checkpoint(ws, members, [digest], attempt)) is not None:
            return Placement(group, found, attempts=attempt)
        for member in members:
            tasks = member_norms(ws, member.name)
            if task in tasks:
                raise GroupTaskExistsError(group, task, member.name)
            snapshot.append(tasks)
        index = capacity.place(snapshot, task, norms, base_norms, names, limit=g.max_interference)
        if index is None:
            try:
                chosen = ws.registry.create_group_member(group, len(members) + 1)
            except GroupMemberConflictError:
                log.info("group %s: another placement added a member; placing again", group)
                continue
            log.info("group %s is full for task %s: new member %s", group, task, chosen.name)
        else:
            chosen = members[index]
        try:
            outcome = ws.fold(chosen.name, source, task, scale=scale, progress=progress)
        except TaskExistsError:
            raise GroupTaskExistsError(group, task, chosen.name) from None
        if outcome.skipped:
            return Placement(group, outcome, attempts=attempt)
        worst = _member_interference(ws, chosen.name, outcome.version, names, base_norms)
        over = worst > g.max_interference
        if over:
            log.warning(
                "group %s: member %s is at r_t %.4g, over the limit %.4g: concurrent "
                "placements folded into it together",
                group,
                chosen.name,
                worst,
                g.max_interference,
            )
        return Placement(
            group,
            outcome,
            created_member=index is None,
            interference=worst,
            over_limit=over,
            attempts=attempt,
        )
    raise GroupContentionError(
        f"bundle group {group!r}: other placements grew it {MAX_PLACEMENT_ATTEMPTS} times "
        "under this one"
    )


def _member_interference(
    ws: Workspace, bundle: str, version: int, names: Sequence[str], base_norms: Norms
) -> float:
    _, manifest = ws.resolve(bundle, str(version))
    loads = capacity.interference(_norms(manifest), base_norms, names)
    return max(loads.values(), default=0.0)


# ----------------------------------------------------------------- queries
def show(ws: Workspace, group: str) -> tuple[GroupRecord, list[MemberLoad]]:
    """Every member's head with each task's predicted r_t and data-free lambda."""
    g = ws.registry.get_group(group)
    heads: list[tuple[BundleRecord, VersionRecord | None]] = [
        (m, ws.registry.head(m.name)) for m in ws.registry.group_members(group)
    ]
    if not any(head is not None for _, head in heads):
        return g, [MemberLoad(m.name, None) for m, _ in heads]
    config = stored_config(g.transform)
    with ws.open_base(g.base_name) as base:
        names = superposed_names(base, config)
    base_norms = ws.base_manifest(g.base_name).norms
    loads = []
    for member, head in heads:
        if head is None:
            loads.append(MemberLoad(member.name, None))
            continue
        manifest = ws.manifest(head)
        norms = _norms(manifest)
        r = capacity.interference(norms, base_norms, names)
        tasks = [
            TaskLoad(
                name=t.name,
                added_in_version=t.added_in_version,
                interference=r[t.name],
                data_free_scale=data_free_scale(
                    t.name, norms, base_norms, names, gain=noise_gain(config.map)
                ),
                scale=t.scale,
            )
            for t in manifest.tasks
        ]
        loads.append(MemberLoad(member.name, head.version, tasks))
    return g, loads


def _check_group_ref(ref: str | None) -> None:
    if ref is not None and _DIGITS.fullmatch(ref):
        raise InvalidValueError(
            f"version {ref} names a version of one bundle, not of a group: use the head "
            "or an alias (e.g. production), or the member bundle itself"
        )


def _resolve_member(ws: Workspace, member: str, ref: str | None) -> VersionRecord | None:
    try:
        return ws.registry.resolve(member, ref)
    except (VersionNotFoundError, AliasNotFoundError):
        return None


def find_task(ws: Workspace, group: str, task: str, ref: str | None) -> VersionRecord:
    """The version of the member holding ``task`` at ``ref`` (head when None, else an
    alias such as ``production``), first member first."""
    _check_group_ref(ref)
    for member in ws.registry.group_members(group):
        record = _resolve_member(ws, member.name, ref)
        if record is None:
            continue
        if any(t.name == task for t in ws.registry.tasks(member.name, version=record.version)):
            return record
    raise GroupTaskNotFoundError(group, task, ref)


def materialize(
    ws: Workspace,
    group: str,
    ref: str | None,
    task: str,
    dest: Path,
    *,
    scale: float | None = None,
    master: bool = False,
    progress: Progress | None = None,
) -> VersionRecord:
    """`Workspace.materialize` of the member version `find_task` picks."""
    record = find_task(ws, group, task, ref)
    with integrity_context(version_context(record.bundle, record.version)):
        ws.materialize(
            record.bundle,
            str(record.version),
            task,
            dest,
            scale=scale,
            master=master,
            progress=progress,
        )
    return record


@reports_full_disk
def pull(
    ws: Workspace, group: str, ref: str | None, dest: Path, *, master: bool = False
) -> GroupPull:
    """Every member's version at ``ref`` (head when None, else an alias) as ONE local
    store at ``dest``: what `Workspace.pull` writes per bundle, objects shared between
    members (the base is downloaded once), ``bundles/<member>.json`` pointers in the
    format of a pulled ``bundle.json``, and ``group.json`` listing them.

    Members without a version under ``ref`` are skipped and named in ``group.json``;
    a group where no member has one is an error.
    """
    _check_group_ref(ref)
    g = ws.registry.get_group(group)
    chosen: list[VersionRecord] = []
    skipped: list[str] = []
    for member in ws.registry.group_members(group):
        record = _resolve_member(ws, member.name, ref)
        if record is None:
            skipped.append(member.name)
        else:
            chosen.append(record)
    if not chosen:
        raise GroupRefNotFoundError(group, ref)
    check_destination(dest)
    with staged_directory(dest) as staging:
        manifests = pull_versions(ws, chosen, staging, master=master)
        (staging / "bundles").mkdir()
        listing = []
        for record, manifest in zip(chosen, manifests, strict=True):
            pointer = pointer_json(record.bundle, record, manifest, master=master)
            (staging / "bundles" / f"{record.bundle}.json").write_text(pointer, encoding="utf-8")
            listing.append(
                {
                    "bundle": record.bundle,
                    "version": record.version,
                    "pointer": f"bundles/{record.bundle}.json",
                    "tasks": [t.name for t in manifest.tasks],
                }
            )
        summary = {
            "group": g.name,
            "base": g.base_name,
            "ref": ref,
            "max_interference": g.max_interference,
            "members": listing,
            "skipped": skipped,
        }
        (staging / "group.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return GroupPull(group, ref, chosen, skipped)
