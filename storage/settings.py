"""Configuration from the environment (``RANDES_*``), with an embedded default.

With nothing set, everything lives under ``~/.randes``: a SQLite registry and a
local-directory store, so one command works on a laptop with no server.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from randes.errors import RandesError


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RANDES_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".randes")
    database_url: SecretStr | None = None
    store_url: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_retry_seconds: float | None = Field(default=None, gt=0)
    """How long one store operation keeps retrying transient S3 failures before it
    raises `StoreUnavailableError` (the store's own default when unset); a flow task
    then retries the whole step later."""
    cache_dir: Path | None = None
    dask_address: str | None = None
    """A Dask scheduler (``tcp://host:8786``) the ingest flow spreads its per-checkpoint
    work over (prefect-dask's DaskTaskRunner); unset: one process folds the batch."""
    torch_threads: int = Field(
        default=1,
        ge=1,
        description=(
            "Intra-op threads for fold / retrieve. Their math is under 10% of the time (the"
            " rest is I/O and hashing), and on small shared machines extra threads only stall"
            " each elementwise op: benchmarks/cost.py measured 1.3-1.9x slower folds with 2."
        ),
    )

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL; SQLite under RANDES_HOME when none is configured."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.home / 'registry.db').resolve()}"

    @property
    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return (self.home / "store").resolve().as_uri()

    @property
    def resolved_cache_dir(self) -> Path:
        """Local content-addressed cache of shards fetched from the store."""
        return (self.cache_dir or self.home / "cache").resolve()


class SettingsError(RandesError):
    """A ``RANDES_*`` variable whose value cannot be used (not a number, out of range...)."""


def load_settings() -> Settings:
    """The settings of the environment; a bad value is one `SettingsError` line naming
    the variable (never its value: RANDES_DATABASE_URL may hold a password)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"RANDES_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise SettingsError("invalid setting " + "; ".join(problems)) from None
