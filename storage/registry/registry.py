"""The registry facade: typed methods over the SQL schema, one short transaction each.

Why a facade and not sessions in the flows: every rule that keeps the registry
consistent under concurrent writers lives here, next to the constraints that back it
(see `commit_version`), and callers get immutable records and specific exceptions
instead of ORM objects and driver errors.

Concurrency model (see DESIGN.md, "Folding is optimistic"): a fold reads head n, builds
n + 1 in the store, then calls `commit_version(version=n + 1)`. Within that one
transaction the registry re-checks the ledger and the head, then inserts; whichever
writer loses gets `AlreadyIngestedError` (same checkpoint) or `VersionConflictError`
(rebuild on the new head). SQLite serializes writers (``BEGIN IMMEDIATE``), so the
checks are exact; PostgreSQL runs them concurrently and the unique constraints decide,
each violation being mapped to the same exceptions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import (
    CursorResult,
    Engine,
    PrimaryKeyConstraint,
    UniqueConstraint,
    delete,
    exists,
    insert,
    select,
    union,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.orm import Session, sessionmaker

from randes.names import validate_name
from storage.registry.engine import make_engine, write_options
from storage.registry.errors import (
    AliasNotFoundError,
    AlreadyIngestedError,
    BaseExistsError,
    BaseNotFoundError,
    BundleExistsError,
    BundleNotFoundError,
    DatabaseUnavailableError,
    GroupExistsError,
    GroupMemberConflictError,
    GroupNotFoundError,
    InvalidValueError,
    MigrationError,
    RegistryError,
    RejectedVersionError,
    SchemaNotInitializedError,
    SeedConflictError,
    TaskExistsError,
    TaskNotFoundError,
    VersionConflictError,
    VersionInUseError,
    VersionNotFoundError,
)
from storage.registry.models import (
    NAME_LEN,
    UQ_ALIAS,
    UQ_BASE_NAME,
    UQ_BUNDLE_NAME,
    UQ_GROUP_NAME,
    UQ_GROUP_POSITION,
    UQ_LEDGER_SOURCE,
    UQ_TASK_LIVE_NAME,
    UQ_TASK_SEED,
    UQ_VERSION,
    VERSION_STATUSES,
    Alias,
    Base,
    BaseModel,
    BaseObject,
    Bundle,
    BundleGroup,
    BundleGroupMember,
    BundleVersion,
    Evaluation,
    IngestionLedger,
    ObjectLease,
    Task,
    VersionObject,
    utcnow,
)
from storage.registry.records import (
    AliasRecord,
    BaseRecord,
    BundleRecord,
    EvaluationRecord,
    GroupRecord,
    NewTask,
    TaskRecord,
    VersionRecord,
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# Rows per statement when a key list is long (stays under SQLite's and PostgreSQL's
# bound-parameter limits).
_CHUNK = 500

# How the backends say "that table/column does not exist" (schema not migrated) ...
_PG_UNDEFINED = ("42P01", "42703")
_SQLITE_UNDEFINED = ("no such table", "no such column")
# ... and "the database file cannot be used right now".
_SQLITE_UNAVAILABLE = (
    "unable to open database",
    "database is locked",
    "disk i/o error",
    "file is not a database",
    "readonly database",
    "database or disk is full",
    "database disk image is malformed",
    "malformed database schema",
    "not authorized",
)

_DIGITS = re.compile(r"[0-9]+")
INT32_MAX = 2**31 - 1
"""Largest version number the registry's integer columns hold."""

GROUP_NAME_MAX = NAME_LEN - 8
"""Longest group name: its members are ``<group>-<n>`` and must fit a bundle name."""
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.+)$")


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


def _violated(exc: IntegrityError) -> str | None:
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


def _first_line(exc: DBAPIError) -> str:
    text = str(exc.orig if exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _check_finite(name: str, value: float | None) -> float | None:
    # SQLite stores NaN as NULL while PostgreSQL keeps it: refuse it on both alike.
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        raise InvalidValueError(f"{name} must be a finite number, got {value}")
    return value


def _check_version_number(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidValueError(f"version must be a non-negative integer, got {version!r}")
    return version


def _dupes(values: Iterable[Any]) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for v in values:
        if v in seen:
            out.append(v)
        seen.add(v)
    return out


def migrations_dir() -> Path:
    """The Alembic script directory shipped inside the `migrations` package."""
    return Path(str(resources.files("migrations")))


class Registry:
    """Typed access to the registry database (SQLite or PostgreSQL through psycopg 3).

    Thread-safe (one engine, a session per call) and cheap to keep for a process's
    lifetime; `close()` (or ``with Registry(url) as reg:``) disposes the pool. A
    Registry must not cross `fork()`: create one per process.
    """

    def __init__(self, url: str) -> None:
        try:
            self._url = make_url(url)
            self._engine: Engine = make_engine(url)
        except (ArgumentError, ValueError, ImportError, NoSuchModuleError) as exc:
            # never quote the URL: a malformed one may still hold a password
            raise RegistryError(
                f"invalid registry database URL (RANDES_DATABASE_URL): {type(exc).__name__}; "
                "expected e.g. sqlite:///path/registry.db or postgresql+psycopg://user@host/db"
            ) from None
        self._writer = self._engine.execution_options(**write_options())
        self._read_session = sessionmaker(self._engine, expire_on_commit=False)
        self._write_session = sessionmaker(self._writer, expire_on_commit=False)

    @classmethod
    def open_existing(cls, url: str) -> Registry:
        """The registry at ``url`` for a read-only query: an embedded (SQLite) registry
        that does not exist yet is an error, not a new empty database and its folders."""
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            return cls(url)  # the constructor reports it
        database = parsed.database
        if (
            parsed.get_backend_name() == "sqlite"
            and database
            and database != ":memory:"
            and not database.startswith("file:")
            and not Path(database).expanduser().is_file()
        ):
            raise SchemaNotInitializedError(
                f"no registry database at {database} (run `randes init`)"
            )
        return cls(url)

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The database URL with its password hidden (safe to log)."""
        return _redacted(self._url).render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection (the registry can still be used afterwards)."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upgrade(self, revision: str = "head") -> None:
        """Bring the schema to `revision` with Alembic (the only way the schema changes).

        Runs in one transaction through this registry's own engine, so SQLite gets the
        same pragmas and a failed migration leaves the previous schema as it was.
        """
        from alembic import command

        self._alembic(command.upgrade, revision)

    def downgrade(self, revision: str) -> None:
        """Take the schema back to `revision` (``base``: drop every registry table)."""
        from alembic import command

        self._alembic(command.downgrade, revision)

    def _alembic(self, action: Callable[[Any, str], None], revision: str) -> None:
        from alembic.config import Config
        from alembic.util.exc import CommandError

        directory = migrations_dir()
        config = Config(str(directory / "alembic.ini"))
        config.set_main_option("script_location", str(directory))
        config.attributes["configure_logger"] = False
        try:
            with self._writer.begin() as conn:
                config.attributes["connection"] = conn
                action(config, revision)
        except DBAPIError as exc:
            if isinstance(translated := self._translate(exc), DatabaseUnavailableError):
                raise translated from None
            raise MigrationError(
                f"migrating the registry schema of {self.url} to {revision} failed "
                f"(nothing was changed): {_first_line(exc)}"
            ) from exc
        except CommandError as exc:
            raise MigrationError(f"cannot migrate the registry schema: {exc}") from exc

    # -- transactions -------------------------------------------------------------------

    def _translate(self, exc: DBAPIError) -> RegistryError | None:
        """The registry error for a driver error about the database as a whole
        (unreachable, locked, schema missing), or None for one the caller must handle."""
        if isinstance(exc, IntegrityError):
            return None
        detail = _first_line(exc)
        for secret in _secrets(self._url):
            detail = detail.replace(secret, "***")
        sqlstate = getattr(exc.orig, "sqlstate", None)
        lowered = detail.lower()
        if sqlstate in _PG_UNDEFINED or any(m in lowered for m in _SQLITE_UNDEFINED):
            return SchemaNotInitializedError(
                f"registry database {self.url} has no registry schema or an outdated one "
                f"(run `randes init`): {detail}"
            )
        unavailable = (
            exc.connection_invalidated
            or any(m in lowered for m in _SQLITE_UNAVAILABLE)
            or (
                self.backend == "postgresql"
                and isinstance(exc, OperationalError)
                and (sqlstate is None or str(sqlstate).startswith(("08", "53", "57")))
            )
        )
        if unavailable:
            return DatabaseUnavailableError(f"registry database {self.url} unavailable: {detail}")
        return None

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        """One transaction: committed on normal exit, rolled back on any exception."""
        factory = self._write_session if write else self._read_session
        try:
            with factory() as session, session.begin():
                yield session
        except DBAPIError as exc:
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from None

    # -- lookups shared by the methods ------------------------------------------------

    @staticmethod
    def _bundle(s: Session, name: str) -> Bundle:
        row = s.scalar(select(Bundle).where(Bundle.name == name))
        if row is None:
            raise BundleNotFoundError(name)
        return row

    @staticmethod
    def _version(s: Session, bundle: Bundle, version: int, *, lock: bool = False) -> BundleVersion:
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

    @staticmethod
    def _head(s: Session, bundle: Bundle) -> BundleVersion | None:
        return s.scalar(
            select(BundleVersion)
            .where(BundleVersion.bundle_id == bundle.id)
            .order_by(BundleVersion.version.desc())
            .limit(1)
        )

    # -- record conversion --------------------------------------------------------------

    @staticmethod
    def _base_record(row: BaseModel) -> BaseRecord:
        return BaseRecord(
            id=row.id,
            name=row.name,
            uri=row.uri,
            sha256=row.sha256,
            manifest_key=row.manifest_key,
            manifest_sha256=row.manifest_sha256,
            created_at=row.created_at,
        )

    @staticmethod
    def _bundle_record(row: Bundle, base_name: str) -> BundleRecord:
        return BundleRecord(
            id=row.id,
            name=row.name,
            base_name=base_name,
            transform=dict(row.transform),
            gate_threshold=row.gate_threshold,
            created_at=row.created_at,
        )

    @staticmethod
    def _version_record(row: BundleVersion, bundle: str) -> VersionRecord:
        return VersionRecord(
            id=row.id,
            bundle=bundle,
            version=row.version,
            parent_version=row.parent_version,
            status=row.status,
            manifest_key=row.manifest_key,
            manifest_sha256=row.manifest_sha256,
            created_at=row.created_at,
        )

    @staticmethod
    def _task_record(row: Task, bundle: str) -> TaskRecord:
        return TaskRecord(
            bundle=bundle,
            name=row.name,
            seed=row.seed,
            source_uri=row.source_uri,
            source_sha256=row.source_sha256,
            added_in_version=row.added_in_version,
            removed_in_version=row.removed_in_version,
        )

    @staticmethod
    def _evaluation_record(row: Evaluation, bundle: str, version: int) -> EvaluationRecord:
        return EvaluationRecord(
            id=row.id,
            bundle=bundle,
            version=version,
            task_name=row.task_name,
            metric=row.metric,
            value=row.value,
            reference=row.reference,
            normalized=row.normalized,
            created_at=row.created_at,
        )

    # -- base models --------------------------------------------------------------------

    def add_base(
        self,
        name: str,
        uri: str,
        sha256: str,
        manifest_key: str,
        manifest_sha256: str,
        object_keys: Sequence[str],
    ) -> BaseRecord:
        """Register a base model and the store keys it references.

        Idempotent: registering the same name with the same sha256 again returns the
        existing record (whatever the uri); a different sha256 raises BaseExistsError.
        """
        validate_name(name, "base name")
        try:
            with self._tx(write=True) as s:
                existing = s.scalar(select(BaseModel).where(BaseModel.name == name))
                if existing is not None:
                    if existing.sha256 != sha256:
                        raise BaseExistsError(name, existing.sha256, sha256)
                    return self._base_record(existing)
                row = BaseModel(
                    name=name,
                    uri=uri,
                    sha256=sha256,
                    manifest_key=manifest_key,
                    manifest_sha256=manifest_sha256,
                )
                s.add(row)
                s.flush()
                keys = _unique(object_keys)
                if keys:
                    s.execute(
                        insert(BaseObject),
                        [{"base_id": row.id, "key": k} for k in keys],
                    )
                return self._base_record(row)
        except IntegrityError as exc:
            if _violated(exc) != UQ_BASE_NAME:
                raise
        # Another writer registered the name between our check and our insert.
        winner = self.get_base(name)
        if winner.sha256 != sha256:
            raise BaseExistsError(name, winner.sha256, sha256)
        return winner

    def get_base(self, name: str) -> BaseRecord:
        with self._tx() as s:
            row = s.scalar(select(BaseModel).where(BaseModel.name == name))
            if row is None:
                raise BaseNotFoundError(name)
            return self._base_record(row)

    def list_bases(self) -> list[BaseRecord]:
        with self._tx() as s:
            rows = s.scalars(select(BaseModel).order_by(BaseModel.name))
            return [self._base_record(r) for r in rows]

    # -- bundles ------------------------------------------------------------------------

    def create_bundle(
        self,
        name: str,
        base_name: str,
        transform: dict[str, Any],
        gate_threshold: float | None = None,
    ) -> BundleRecord:
        """Create an (empty, version-less) bundle over a registered base."""
        validate_name(name, "bundle name")
        gate_threshold = _check_finite("gate_threshold", gate_threshold)
        try:
            with self._tx(write=True) as s:
                base = s.scalar(select(BaseModel).where(BaseModel.name == base_name))
                if base is None:
                    raise BaseNotFoundError(base_name)
                if s.scalar(select(Bundle.id).where(Bundle.name == name)) is not None:
                    raise BundleExistsError(name)
                row = Bundle(
                    name=name,
                    base_id=base.id,
                    transform=dict(transform),
                    gate_threshold=gate_threshold,
                )
                s.add(row)
                s.flush()
                return self._bundle_record(row, base.name)
        except IntegrityError as exc:
            if _violated(exc) == UQ_BUNDLE_NAME:
                raise BundleExistsError(name) from None
            raise

    def get_bundle(self, name: str) -> BundleRecord:
        with self._tx() as s:
            row = s.execute(
                select(Bundle, BaseModel.name)
                .join(BaseModel, Bundle.base_id == BaseModel.id)
                .where(Bundle.name == name)
            ).one_or_none()
            if row is None:
                raise BundleNotFoundError(name)
            return self._bundle_record(row[0], row[1])

    def list_bundles(self) -> list[BundleRecord]:
        with self._tx() as s:
            rows = s.execute(
                select(Bundle, BaseModel.name)
                .join(BaseModel, Bundle.base_id == BaseModel.id)
                .order_by(Bundle.name)
            ).all()
            return [self._bundle_record(b, base) for b, base in rows]

    # -- bundle groups ------------------------------------------------------------------

    @staticmethod
    def _group(s: Session, name: str) -> BundleGroup:
        row = s.scalar(select(BundleGroup).where(BundleGroup.name == name))
        if row is None:
            raise GroupNotFoundError(name)
        return row

    @staticmethod
    def _group_record(row: BundleGroup, base_name: str) -> GroupRecord:
        return GroupRecord(
            id=row.id,
            name=row.name,
            base_name=base_name,
            transform=dict(row.transform),
            gate_threshold=row.gate_threshold,
            max_interference=row.max_interference,
            created_at=row.created_at,
        )

    def create_group(
        self,
        name: str,
        base_name: str,
        transform: dict[str, Any],
        *,
        max_interference: float,
        gate_threshold: float | None = None,
    ) -> GroupRecord:
        """Create an empty bundle group over a registered base.

        Its members are named ``<name>-<n>``, so the name leaves room for the suffix.
        """
        validate_name(name, "group name")
        if len(name) > GROUP_NAME_MAX:
            raise InvalidValueError(
                f"group name {name[:40]!r}... is too long: its members are named "
                f"<group>-<n>, so a group name has at most {GROUP_NAME_MAX} characters"
            )
        limit = _check_finite("max_interference", max_interference)
        if limit is None or limit <= 0:
            raise InvalidValueError(
                f"max_interference must be a number greater than 0, got {max_interference}"
            )
        gate_threshold = _check_finite("gate_threshold", gate_threshold)
        try:
            with self._tx(write=True) as s:
                base = s.scalar(select(BaseModel).where(BaseModel.name == base_name))
                if base is None:
                    raise BaseNotFoundError(base_name)
                if s.scalar(select(BundleGroup.id).where(BundleGroup.name == name)) is not None:
                    raise GroupExistsError(name)
                row = BundleGroup(
                    name=name,
                    base_id=base.id,
                    transform=dict(transform),
                    gate_threshold=gate_threshold,
                    max_interference=limit,
                )
                s.add(row)
                s.flush()
                return self._group_record(row, base.name)
        except IntegrityError as exc:
            if _violated(exc) == UQ_GROUP_NAME:
                raise GroupExistsError(name) from None
            raise

    def get_group(self, name: str) -> GroupRecord:
        with self._tx() as s:
            row = s.execute(
                select(BundleGroup, BaseModel.name)
                .join(BaseModel, BundleGroup.base_id == BaseModel.id)
                .where(BundleGroup.name == name)
            ).one_or_none()
            if row is None:
                raise GroupNotFoundError(name)
            return self._group_record(row[0], row[1])

    def list_groups(self) -> list[GroupRecord]:
        with self._tx() as s:
            rows = s.execute(
                select(BundleGroup, BaseModel.name)
                .join(BaseModel, BundleGroup.base_id == BaseModel.id)
                .order_by(BundleGroup.name)
            ).all()
            return [self._group_record(g, base) for g, base in rows]

    def group_members(self, group: str) -> list[BundleRecord]:
        """The group's bundles in the order they were created (their positions)."""
        with self._tx() as s:
            g = self._group(s, group)
            rows = s.execute(
                select(Bundle, BaseModel.name)
                .join(BundleGroupMember, BundleGroupMember.bundle_id == Bundle.id)
                .join(BaseModel, Bundle.base_id == BaseModel.id)
                .where(BundleGroupMember.group_id == g.id)
                .order_by(BundleGroupMember.position)
            ).all()
            return [self._bundle_record(b, base) for b, base in rows]

    def group_of(self, bundle: str) -> str | None:
        """The group ``bundle`` belongs to, or None."""
        with self._tx() as s:
            b = self._bundle(s, bundle)
            return s.scalar(
                select(BundleGroup.name)
                .join(BundleGroupMember, BundleGroupMember.group_id == BundleGroup.id)
                .where(BundleGroupMember.bundle_id == b.id)
            )

    def create_group_member(self, group: str, position: int) -> BundleRecord:
        """Add member number ``position`` (1-based) to the group: a new empty bundle with
        the group's base, transform and gate, named ``<group>-<n>``.

        ``position`` must be the number of members the caller saw plus one, checked in
        the transaction: if another placement added a member meanwhile, this raises
        GroupMemberConflictError (as does losing the insert race on PostgreSQL), and the
        caller places again over the members as they are now, the new one included. The
        name is ``<group>-<position>``, or the next free suffix when a bundle outside
        the group already has that name.
        """
        if isinstance(position, bool) or not isinstance(position, int) or position < 1:
            raise InvalidValueError(f"member position must be an integer >= 1, got {position!r}")
        try:
            with self._tx(write=True) as s:
                g = self._group(s, group)
                last = s.scalar(
                    select(BundleGroupMember.position)
                    .where(BundleGroupMember.group_id == g.id)
                    .order_by(BundleGroupMember.position.desc())
                    .limit(1)
                )
                if (last or 0) + 1 != position:
                    raise GroupMemberConflictError(group, position)
                taken = set(
                    s.scalars(
                        select(Bundle.name).where(
                            Bundle.name.startswith(f"{group}-", autoescape=True)
                        )
                    )
                )
                suffix = position
                while f"{group}-{suffix}" in taken:
                    suffix += 1
                row = Bundle(
                    name=f"{group}-{suffix}",
                    base_id=g.base_id,
                    transform=dict(g.transform),
                    gate_threshold=g.gate_threshold,
                )
                s.add(row)
                s.flush()
                s.add(BundleGroupMember(bundle_id=row.id, group_id=g.id, position=position))
                s.flush()
                base_name = s.scalar(select(BaseModel.name).where(BaseModel.id == g.base_id))
                assert base_name is not None
                return self._bundle_record(row, base_name)
        except IntegrityError as exc:
            if _violated(exc) in (UQ_GROUP_POSITION, UQ_BUNDLE_NAME):
                raise GroupMemberConflictError(group, position) from None
            raise

    # -- versions -----------------------------------------------------------------------

    def head(self, bundle: str) -> VersionRecord | None:
        """The highest-numbered version of the bundle (whatever its status), or None."""
        with self._tx() as s:
            row = self._head(s, self._bundle(s, bundle))
            return None if row is None else self._version_record(row, bundle)

    def get_version(self, bundle: str, version: int) -> VersionRecord:
        with self._tx() as s:
            return self._version_record(self._version(s, self._bundle(s, bundle), version), bundle)

    def list_versions(self, bundle: str) -> list[VersionRecord]:
        with self._tx() as s:
            b = self._bundle(s, bundle)
            rows = s.scalars(
                select(BundleVersion)
                .where(BundleVersion.bundle_id == b.id)
                .order_by(BundleVersion.version)
            )
            return [self._version_record(r, bundle) for r in rows]

    def resolve(self, bundle: str, ref: str | None) -> VersionRecord:
        """A version from a user reference: None -> head, digits -> that number, else an alias."""
        with self._tx() as s:
            b = self._bundle(s, bundle)
            if ref is None or ref == "":
                row = self._head(s, b)
                if row is None:
                    raise VersionNotFoundError(bundle, None)
                return self._version_record(row, bundle)
            if _DIGITS.fullmatch(ref):
                return self._version_record(self._version(s, b, int(ref)), bundle)
            row = s.scalar(
                select(BundleVersion)
                .join(Alias, Alias.version_id == BundleVersion.id)
                .where(Alias.bundle_id == b.id, Alias.name == ref)
            )
            if row is None:
                raise AliasNotFoundError(bundle, ref)
            return self._version_record(row, bundle)

    def commit_version(
        self,
        bundle: str,
        *,
        version: int,
        parent_version: int | None,
        manifest_key: str,
        manifest_sha256: str,
        object_keys: Sequence[str],
        added: Sequence[NewTask] = (),
        removed: Sequence[str] = (),
        ledger: Sequence[tuple[str, str]] = (),
    ) -> VersionRecord:
        """Make a new version visible, atomically, with everything it changes.

        In ONE transaction: the version row (status ``staged``), the store keys it
        references, its new tasks, the removal marks of `removed` tasks, and the ledger
        rows (source_sha256, task_name). Either all of it commits or none of it does.

        `version` must be head + 1 (0 or 1 for a bundle's first version), checked inside
        the transaction, so a writer working from a stale head can neither overwrite
        nor skip a number. Errors: AlreadyIngestedError (a ledger sha256 is already in
        the bundle; checked first, since it tells a fold to stop rather than retry),
        VersionConflictError (another writer took the number: rebuild on the new head),
        TaskExistsError, SeedConflictError, TaskNotFoundError (a removed task is not
        live), VersionNotFoundError (unknown parent).
        """
        _check_version_number(version)
        if parent_version is not None:
            _check_version_number(parent_version)
        for task in added:
            validate_name(task.name, "task name")
            if isinstance(task.seed, bool) or not isinstance(task.seed, int):
                raise InvalidValueError(f"seed of task {task.name!r} must be an integer")
            if not INT64_MIN <= task.seed <= INT64_MAX:
                raise InvalidValueError(
                    f"seed {task.seed} of task {task.name!r} does not fit a signed 64-bit integer"
                )
        ledger_shas = [sha for sha, _task in ledger]
        if dup := _dupes(ledger_shas):
            raise InvalidValueError(f"checkpoint {dup[0]} appears twice in the ledger rows")
        keys = _unique(object_keys)

        try:
            with self._tx(write=True) as s:
                b = self._bundle(s, bundle)

                def check_ledger() -> None:
                    if not ledger_shas:
                        return
                    _drop_stale_ledger_rows(s, b.id, ledger_shas)
                    hit = s.execute(
                        select(
                            IngestionLedger.source_sha256,
                            IngestionLedger.task_name,
                            IngestionLedger.version,
                        )
                        .where(
                            IngestionLedger.bundle_id == b.id,
                            IngestionLedger.source_sha256.in_(ledger_shas),
                        )
                        .limit(1)
                    ).first()
                    if hit is not None:
                        raise AlreadyIngestedError(bundle, hit[0], hit[1], hit[2])

                # 1. The ledger first: the same checkpoint twice is a no-op, not a retry.
                check_ledger()
                # 2. The head: only head + 1 may be committed.
                head = self._head(s, b)
                next_ok = (0, 1) if head is None else (head.version + 1,)
                if version not in next_ok:
                    # Under READ COMMITTED (PostgreSQL) a racer may have committed this
                    # very checkpoint between the ledger check and the head read: say so
                    # (stop), rather than "version taken" (rebuild and find it anyway).
                    check_ledger()
                    raise VersionConflictError(
                        bundle, version, head.version if head is not None else None
                    )
                if parent_version is not None:
                    self._version(s, b, parent_version)
                # 3. Tasks: clear errors for the common cases (the constraints back them).
                removed_set = set(removed)
                if added:
                    live = set(
                        s.scalars(
                            select(Task.name).where(
                                Task.bundle_id == b.id,
                                Task.removed_in_version.is_(None),
                                Task.name.in_([t.name for t in added]),
                            )
                        )
                    )
                    for t in added:
                        if t.name in live and t.name not in removed_set:
                            raise TaskExistsError(bundle, t.name)
                    used = set(
                        s.scalars(
                            select(Task.seed).where(
                                Task.bundle_id == b.id, Task.seed.in_([t.seed for t in added])
                            )
                        )
                    )
                    for t in added:
                        if t.seed in used:
                            raise SeedConflictError(bundle, t.seed)

                # Inserts, in the order that makes a racing loser fail most specifically.
                if ledger:
                    s.execute(
                        insert(IngestionLedger),
                        [
                            {
                                "bundle_id": b.id,
                                "source_sha256": sha,
                                "task_name": task_name,
                                "version": version,
                            }
                            for sha, task_name in ledger
                        ],
                    )
                row = BundleVersion(
                    bundle_id=b.id,
                    version=version,
                    parent_version=parent_version,
                    status="staged",
                    manifest_key=manifest_key,
                    manifest_sha256=manifest_sha256,
                )
                s.add(row)
                s.flush()
                for chunk in _chunks(keys):
                    s.execute(
                        insert(VersionObject),
                        [{"version_id": row.id, "key": k} for k in chunk],
                    )
                for name in removed:
                    result: CursorResult[Any] = s.execute(  # type: ignore[assignment]
                        update(Task)
                        .where(
                            Task.bundle_id == b.id,
                            Task.name == name,
                            Task.removed_in_version.is_(None),
                        )
                        .values(removed_in_version=version)
                    )
                    if result.rowcount != 1:
                        raise TaskNotFoundError(bundle, name)
                    # What remove takes out leaves the ledger too: folding that
                    # checkpoint again is a new fold, not "already folded".
                    s.execute(
                        delete(IngestionLedger).where(
                            IngestionLedger.bundle_id == b.id, IngestionLedger.task_name == name
                        )
                    )
                if added:
                    s.execute(
                        insert(Task),
                        [
                            {
                                "bundle_id": b.id,
                                "name": t.name,
                                "seed": t.seed,
                                "source_uri": t.source_uri,
                                "source_sha256": t.source_sha256,
                                "added_in_version": version,
                                "removed_in_version": None,
                            }
                            for t in added
                        ],
                    )
                return self._version_record(row, bundle)
        except IntegrityError as exc:
            constraint = _violated(exc)
            if constraint == UQ_LEDGER_SOURCE:
                raise self._already_ingested(bundle, ledger_shas) from None
            if constraint == UQ_VERSION:
                for source_sha in ledger_shas:  # the racer that took it may be this checkpoint
                    hit = self.ledger_lookup(bundle, source_sha)
                    if hit is not None:
                        raise AlreadyIngestedError(bundle, source_sha, hit[0], hit[1]) from None
                raise VersionConflictError(bundle, version, None) from None
            if constraint == UQ_TASK_LIVE_NAME:
                dup_names = _dupes(t.name for t in added)
                raise TaskExistsError(
                    bundle, dup_names[0] if dup_names else ", ".join(t.name for t in added)
                ) from None
            if constraint == UQ_TASK_SEED:
                dup_seeds = _dupes(t.seed for t in added)
                raise SeedConflictError(bundle, dup_seeds[0] if dup_seeds else None) from None
            raise

    def _already_ingested(self, bundle: str, shas: Sequence[str]) -> AlreadyIngestedError:
        """The error for a ledger conflict found by the constraint (a racing writer won)."""
        for sha in shas:
            hit = self.ledger_lookup(bundle, sha)
            if hit is not None:
                return AlreadyIngestedError(bundle, sha, hit[0], hit[1])
        return AlreadyIngestedError(bundle, shas[0] if shas else "?", None, None)

    def set_status(self, bundle: str, version: int, status: str) -> VersionRecord:
        """Move a version to `status`; ``published`` only from validated (or published)."""
        if status not in VERSION_STATUSES:
            raise InvalidValueError(
                f"unknown status {status!r}: expected one of {', '.join(VERSION_STATUSES)}"
            )
        with self._tx(write=True) as s:
            row = self._version(s, self._bundle(s, bundle), version, lock=True)
            if status == "published" and row.status not in ("validated", "published"):
                raise RejectedVersionError(bundle, version, row.status)
            row.status = status
            s.flush()
            return self._version_record(row, bundle)

    def delete_versions(self, bundle: str, versions: Sequence[int]) -> None:
        """Delete version rows (with their object keys and evaluations), for retention/gc.

        Refuses (VersionInUseError, nothing deleted) a version an alias names, a
        published one (its row locked, so a concurrent publish is seen), and the
        head: its number must stay taken, or the next fold would reuse it. Tasks and
        ledger rows stay: they are the bundle's history, not the version's.
        """
        if not versions:
            return
        with self._tx(write=True) as s:
            b = self._bundle(s, bundle)
            head = self._head(s, b)
            aliased: dict[int, str] = {
                v: name
                for v, name in s.execute(
                    select(BundleVersion.version, Alias.name)
                    .join(Alias, Alias.version_id == BundleVersion.id)
                    .where(Alias.bundle_id == b.id)
                )
            }
            ids = []
            for v in dict.fromkeys(versions):
                row = self._version(s, b, v, lock=True)
                if row.status == "published":
                    raise VersionInUseError(bundle, row.version, "it is published")
                if row.version in aliased:
                    raise VersionInUseError(
                        bundle, row.version, f"alias {aliased[row.version]!r} names it"
                    )
                if head is not None and row.version == head.version:
                    raise VersionInUseError(bundle, row.version, "it is the head")
                ids.append(row.id)
            s.execute(delete(BundleVersion).where(BundleVersion.id.in_(ids)))

    # -- tasks and ledger ---------------------------------------------------------------

    def tasks(
        self,
        bundle: str | None = None,
        *,
        version: int | None = None,
        include_removed: bool = False,
    ) -> list[TaskRecord]:
        """Tasks of one bundle (or all), as of `version` (default: now).

        A task is present in version v when added_in_version <= v and it was not removed
        by v (removed_in_version is NULL or > v). With `include_removed`, tasks removed
        by then are listed too (with their removed_in_version).
        """
        if version is not None and bundle is None:
            raise InvalidValueError("a version can only be given together with a bundle")
        with self._tx() as s:
            query = select(Task, Bundle.name).join(Bundle, Task.bundle_id == Bundle.id)
            if bundle is not None:
                b = self._bundle(s, bundle)
                query = query.where(Task.bundle_id == b.id)
                if version is not None:
                    self._version(s, b, version)
                    query = query.where(Task.added_in_version <= version)
                    if not include_removed:
                        query = query.where(
                            (Task.removed_in_version.is_(None))
                            | (Task.removed_in_version > version)
                        )
            if version is None and not include_removed:
                query = query.where(Task.removed_in_version.is_(None))
            rows = s.execute(query.order_by(Bundle.name, Task.added_in_version, Task.id)).all()
            return [self._task_record(t, name) for t, name in rows]

    def ledger_lookup(self, bundle: str, source_sha256: str) -> tuple[str, int] | None:
        """(task name, version) under which that checkpoint was folded in, or None."""
        with self._tx() as s:
            b = self._bundle(s, bundle)
            hit = s.execute(
                select(IngestionLedger.task_name, IngestionLedger.version).where(
                    IngestionLedger.bundle_id == b.id,
                    IngestionLedger.source_sha256 == source_sha256,
                    ~_task_removed_since(),
                )
            ).first()
            return None if hit is None else (hit[0], hit[1])

    def used_seeds(self, bundle: str) -> set[int]:
        """Every seed the bundle ever used, removed tasks included (seeds are never reused)."""
        with self._tx() as s:
            b = self._bundle(s, bundle)
            return set(s.scalars(select(Task.seed).where(Task.bundle_id == b.id)))

    # -- evaluations --------------------------------------------------------------------

    def add_evaluation(
        self,
        bundle: str,
        version: int,
        task_name: str,
        metric: str,
        value: float,
        reference: float | None = None,
        normalized: float | None = None,
    ) -> EvaluationRecord:
        checked = _check_finite("value", value)
        assert checked is not None
        reference = _check_finite("reference", reference)
        normalized = _check_finite("normalized", normalized)
        with self._tx(write=True) as s:
            v = self._version(s, self._bundle(s, bundle), version)
            row = Evaluation(
                version_id=v.id,
                task_name=task_name,
                metric=metric,
                value=checked,
                reference=reference,
                normalized=normalized,
            )
            s.add(row)
            s.flush()
            return self._evaluation_record(row, bundle, version)

    def evaluations(self, bundle: str, version: int) -> list[EvaluationRecord]:
        with self._tx() as s:
            v = self._version(s, self._bundle(s, bundle), version)
            rows = s.scalars(
                select(Evaluation).where(Evaluation.version_id == v.id).order_by(Evaluation.id)
            )
            return [self._evaluation_record(r, bundle, version) for r in rows]

    # -- aliases ------------------------------------------------------------------------

    def set_alias(self, bundle: str, alias: str, version: int) -> AliasRecord:
        """Point `alias` at `version` (created or moved atomically) and publish that version.

        Only a validated or published version may be aliased (RejectedVersionError).
        Alias names are never all digits, so `resolve` cannot confuse them with numbers.
        """
        validate_name(alias, "alias name")
        if _DIGITS.fullmatch(alias):
            raise InvalidValueError(f"alias {alias!r} would read as a version number")
        for _attempt in range(3):
            try:
                with self._tx(write=True) as s:
                    b = self._bundle(s, bundle)
                    v = self._version(s, b, version, lock=True)
                    if v.status not in ("validated", "published"):
                        raise RejectedVersionError(bundle, version, v.status)
                    v.status = "published"
                    row = s.scalar(
                        select(Alias)
                        .where(Alias.bundle_id == b.id, Alias.name == alias)
                        .with_for_update()
                    )
                    now = utcnow()
                    if row is None:
                        row = Alias(bundle_id=b.id, name=alias, version_id=v.id, updated_at=now)
                        s.add(row)
                    else:
                        row.version_id = v.id
                        row.updated_at = now
                    s.flush()
                    return AliasRecord(bundle, alias, version, row.updated_at)
            except IntegrityError as exc:
                # Two writers created the alias at once (PostgreSQL): move it instead.
                if _violated(exc) != UQ_ALIAS:
                    raise
        raise VersionConflictError(bundle, version, None)

    def aliases(self, bundle: str) -> list[AliasRecord]:
        with self._tx() as s:
            b = self._bundle(s, bundle)
            rows = s.execute(
                select(Alias.name, BundleVersion.version, Alias.updated_at)
                .join(BundleVersion, Alias.version_id == BundleVersion.id)
                .where(Alias.bundle_id == b.id)
                .order_by(Alias.name)
            ).all()
            return [AliasRecord(bundle, name, v, at) for name, v, at in rows]

    # -- garbage collection support -----------------------------------------------------

    def referenced_keys(self) -> set[str]:
        """Every store key some base or version references (objects and manifests)."""
        with self._tx() as s:
            query = union(
                select(VersionObject.key),
                select(BaseObject.key),
                select(BundleVersion.manifest_key),
                select(BaseModel.manifest_key),
            )
            return set(s.scalars(select(query.subquery().c[0])))

    def lease(self, keys: Sequence[str], owner: str, ttl_s: float) -> None:
        """Protect `keys` from gc for `ttl_s` seconds while `owner` writes them.

        Renewing extends the expiry. `owner` must be unique per writer (e.g. host, pid
        and a random suffix). Expired leases are pruned on the way.
        """
        if not math.isfinite(ttl_s) or ttl_s <= 0:
            raise InvalidValueError(f"lease ttl must be a positive number of seconds, got {ttl_s}")
        unique = _unique(keys)
        with self._tx(write=True) as s:
            now = utcnow()
            expires = now + timedelta(seconds=ttl_s)
            s.execute(delete(ObjectLease).where(ObjectLease.expires_at <= now))
            for chunk in _chunks(unique):
                s.execute(
                    delete(ObjectLease).where(
                        ObjectLease.owner == owner, ObjectLease.key.in_(chunk)
                    )
                )
                s.execute(
                    insert(ObjectLease),
                    [{"key": k, "owner": owner, "expires_at": expires} for k in chunk],
                )

    def release(self, owner: str) -> None:
        """Drop every lease `owner` holds (after its commit, or when it gives up)."""
        with self._tx(write=True) as s:
            s.execute(delete(ObjectLease).where(ObjectLease.owner == owner))

    def leased_keys(self) -> set[str]:
        """Keys under an unexpired lease: gc must not delete them."""
        with self._tx() as s:
            return set(
                s.scalars(
                    select(ObjectLease.key).where(ObjectLease.expires_at > utcnow()).distinct()
                )
            )

    # -- misc ---------------------------------------------------------------------------

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at (None: never migrated)."""
        from alembic.runtime.migration import MigrationContext

        try:
            with self._engine.connect() as conn:
                return MigrationContext.configure(conn).get_current_revision()
        except DBAPIError as exc:
            translated = self._translate(exc)
            if translated is None:
                raise
            raise translated from None


_SECRET_QUERY_KEYS = frozenset({"password", "passfile", "sslpassword"})


def _secrets(url: URL) -> list[str]:
    """Every secret a URL carries: the user-info password and password-like query keys."""
    found = [str(url.password)] if url.password else []
    for key, value in url.query.items():
        if key.lower() in _SECRET_QUERY_KEYS:
            values = value if isinstance(value, tuple) else (value,)
            found.extend(v for v in values if v)
    return found


def _redacted(url: URL) -> URL:
    """``url`` with password-like query values replaced by ``***`` (user info is left to
    SQLAlchemy's ``hide_password``)."""
    hidden = {k: "***" for k in url.query if k.lower() in _SECRET_QUERY_KEYS}
    return url.update_query_dict(hidden) if hidden else url


def _task_removed_since(ledger: Any = IngestionLedger) -> Any:
    """The ledger row's task was removed: a registry whose `remove` predates removing
    ledger rows still holds rows for checkpoints no version has any more."""
    return exists().where(
        Task.bundle_id == ledger.bundle_id,
        Task.name == ledger.task_name,
        Task.added_in_version == ledger.version,
        Task.removed_in_version.is_not(None),
    )


def _drop_stale_ledger_rows(s: Session, bundle_id: int, shas: Sequence[str]) -> None:
    """Delete ledger rows of ``shas`` whose task was removed (see above), so that the
    checkpoint can be folded again instead of colliding with its old row."""
    s.execute(
        delete(IngestionLedger).where(
            IngestionLedger.bundle_id == bundle_id,
            IngestionLedger.source_sha256.in_(list(shas)),
            _task_removed_since(),
        )
    )
