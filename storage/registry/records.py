"""Plain, immutable values the registry returns (never ORM objects).

ORM instances are tied to a session and lazily load from the database; handing them
to flows would leak transactions across layers. These dataclasses are detached
snapshots taken inside the method's own short transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

VersionStatus = Literal["staged", "validated", "published", "rejected"]


@dataclass(frozen=True)
class BaseRecord:
    id: int
    name: str
    uri: str
    sha256: str
    manifest_key: str
    manifest_sha256: str
    created_at: datetime


@dataclass(frozen=True)
class BundleRecord:
    id: int
    name: str
    base_name: str
    transform: dict[str, Any]
    gate_threshold: float | None
    created_at: datetime


@dataclass(frozen=True)
class GroupRecord:
    """A bundle group: the template of its members and their interference limit."""

    id: int
    name: str
    base_name: str
    transform: dict[str, Any]
    gate_threshold: float | None
    max_interference: float
    created_at: datetime


@dataclass(frozen=True)
class VersionRecord:
    id: int
    bundle: str
    version: int
    parent_version: int | None
    status: str
    manifest_key: str
    manifest_sha256: str
    created_at: datetime


@dataclass(frozen=True)
class TaskRecord:
    bundle: str
    name: str
    seed: int
    source_uri: str
    source_sha256: str
    added_in_version: int
    removed_in_version: int | None

    def present_in(self, version: int) -> bool:
        """Whether the task is part of `version`: added_in <= version < removed_in."""
        return self.added_in_version <= version and (
            self.removed_in_version is None or version < self.removed_in_version
        )


@dataclass(frozen=True)
class EvaluationRecord:
    id: int
    bundle: str
    version: int
    task_name: str
    metric: str
    value: float
    reference: float | None
    normalized: float | None
    created_at: datetime


@dataclass(frozen=True)
class AliasRecord:
    bundle: str
    name: str
    version: int
    updated_at: datetime


@dataclass(frozen=True)
class NewTask:
    """A task to add in `Registry.commit_version`."""

    name: str
    seed: int
    source_uri: str
    source_sha256: str
