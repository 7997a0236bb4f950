"""Shared by every concept module of the registry: row lookups, record conversion,
argument checks and the naming of violated unique constraints.

Why module functions and not methods: each takes the session of the caller's own
transaction, so a lookup never opens a second one, and the same lookup serves every
concept (a version is found the same way by a commit, an evaluation and an alias).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import PrimaryKeyConstraint, UniqueConstraint, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.registry.errors import (
    BaseNotFoundError,
    BundleNotFoundError,
    GroupNotFoundError,
    InvalidValueError,
    VersionNotFoundError,
)
from storage.registry.models import (
    NAME_LEN,
    Base,
    BaseModel,
    Bundle,
    BundleGroup,
    BundleVersion,
    Evaluation,
    Task,
)
from storage.registry.records import (
    BaseRecord,
    BundleRecord,
    EvaluationRecord,
    GroupRecord,
    TaskRecord,
    VersionRecord,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Rows per statement when a key list is long (stays under SQLite's and PostgreSQL's
# bound-parameter limits).
_CHUNK = 500

DIGITS = re.compile(r"[0-9]+")
INT32_MAX = 2**31 - 1
"""Largest version number the registry's integer columns hold."""

GROUP_NAME_MAX = NAME_LEN - 8
"""Longest group name: its members are ``<group>-<n>`` and must fit a bundle name."""
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.+)$")

R = TypeVar("R")
T = TypeVar("T")
N = TypeVar("N", BaseModel, Bundle, BundleGroup)


# -- constraint names ---------------------------------------------------------------------


def _unique_constraints_by_columns() -> dict[tuple[str, frozenset[str]], str]:
    """(table, columns) -> constraint name, to name SQLite's unique violations.

    SQLite reports "UNIQUE constraint failed: tasks.bundle_id, tasks.seed" without the
    constraint name PostgreSQL gives; the columns identify it just as well.
    """
    out: dict[tuple[str, frozenset[str]], str] = {}
    for table in Base.metadata.tables.values():
        for constraint in table.constraints:
            if isinstance(constraint, UniqueConstraint | PrimaryKeyConstraint) and constraint.name:
                cols = frozenset(c.name for c in constraint.columns)
                out[(table.name, cols)] = str(constraint.name)
        for index in table.indexes:
            if index.unique and index.name:
                out[(table.name, frozenset(c.name for c in index.columns))] = str(index.name)
    return out


_UNIQUE_BY_COLUMNS = _unique_constraints_by_columns()


def violated(exc: IntegrityError) -> str | None:
    """Name of the constraint an IntegrityError violated, on PostgreSQL or SQLite."""
    diag = getattr(exc.orig, "diag", None)
    if diag is not None:
        name = getattr(diag, "constraint_name", None)
        return str(name) if name else None
    match = _SQLITE_UNIQUE.search(str(exc.orig))
    if match is None:
        return None
    qualified = [c.strip() for c in match.group(1).split(",")]
    table = qualified[0].split(".", 1)[0]
    cols = frozenset(c.split(".", 1)[1] for c in qualified if "." in c)
    return _UNIQUE_BY_COLUMNS.get((table, cols))


# -- argument checks ----------------------------------------------------------------------


def chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def check_finite(name: str, value: float | None) -> float | None:
    # SQLite stores NaN as NULL while PostgreSQL keeps it: refuse it on both alike.
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValueError(f"{name} must be a finite number, got {value}")
    return value


def check_version_number(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidValueError(f"version must be a non-negative integer, got {version!r}")
    return version


def dupes(values: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for v in values:
        if v in seen:
            out.append(v)
        seen.add(v)
    return out


# -- lookups inside the caller's transaction ----------------------------------------------


def _named(s: Session, model: type[N], name: str, missing: Exception) -> N:
    row = s.scalar(select(model).where(model.name == name))
    if row is None:
        raise missing
    return row


def base_row(s: Session, name: str) -> BaseModel:
    return _named(s, BaseModel, name, BaseNotFoundError(name))


def bundle_row(s: Session, name: str) -> Bundle:
    return _named(s, Bundle, name, BundleNotFoundError(name))


def group_row(s: Session, name: str) -> BundleGroup:
    return _named(s, BundleGroup, name, GroupNotFoundError(name))


def version_row(s: Session, bundle: Bundle, version: int, *, lock: bool = False) -> BundleVersion:
    if not 0 <= version <= INT32_MAX:  # past the column's range: no such version
        raise VersionNotFoundError(bundle.name, version)
    query = select(BundleVersion).where(
        BundleVersion.bundle_id == bundle.id, BundleVersion.version == version
    )
    if lock:
        query = query.with_for_update()
    row = s.scalar(query)
    if row is None:
        raise VersionNotFoundError(bundle.name, version)
    return row


def head_row(s: Session, bundle: Bundle) -> BundleVersion | None:
    return s.scalar(
        select(BundleVersion)
        .where(BundleVersion.bundle_id == bundle.id)
        .order_by(BundleVersion.version.desc())
        .limit(1)
    )


# -- record conversion --------------------------------------------------------------------


def _snapshot(record: type[R], row: Any, **given: Any) -> R:
    """A ``record`` whose fields are ``given`` or else the row's attributes of the same
    name: the records mirror their tables column for column."""
    names = (f.name for f in dataclasses.fields(record))  # type: ignore[arg-type]
    return record(**{f: given[f] if f in given else getattr(row, f) for f in names})


def base_record(row: BaseModel) -> BaseRecord:
    return _snapshot(BaseRecord, row)


def bundle_record(row: Bundle, base_name: str) -> BundleRecord:
    return _snapshot(BundleRecord, row, base_name=base_name, transform=dict(row.transform))


def group_record(row: BundleGroup, base_name: str) -> GroupRecord:
    return _snapshot(GroupRecord, row, base_name=base_name, transform=dict(row.transform))


def version_record(row: BundleVersion, bundle: str) -> VersionRecord:
    return _snapshot(VersionRecord, row, bundle=bundle)


def task_record(row: Task, bundle: str) -> TaskRecord:
    return _snapshot(TaskRecord, row, bundle=bundle)


def evaluation_record(row: Evaluation, bundle: str, version: int) -> EvaluationRecord:
    return _snapshot(EvaluationRecord, row, bundle=bundle, version=version)


# -- named rows over a base (bundles and groups) ------------------------------------------


@contextmanager
def raising_on(constraints: str | tuple[str, ...], error: Exception) -> Iterator[None]:
    """Turn the violation of one of ``constraints`` (a racing writer won) into ``error``;
    any other integrity error passes through. Wrap the whole transaction: PostgreSQL may
    report the violation only at commit."""
    names = (constraints,) if isinstance(constraints, str) else constraints
    try:
        yield
    except IntegrityError as exc:
        if violated(exc) in names:
            raise error from None
        raise


def with_base_name(model: Any) -> Any:
    """``SELECT model, base name`` for a bundle or group query (its records carry it)."""
    return select(model, BaseModel.name).join(BaseModel, model.base_id == BaseModel.id)


def inserted(s: Session, row: T) -> T:
    """``row`` inserted (flushed, so its id and defaults are set) in the caller's
    transaction."""
    s.add(row)
    s.flush()
    return row
