"""Prefect as a new user meets it: a cold first start, and a server that is not there.

These run the real `randes` console script in a subprocess with its own environment:
Prefect reads its settings when it is imported, so a fresh ``PREFECT_HOME`` or an
unreachable ``PREFECT_API_URL`` can only be tried in a process of its own.

- cold start: ``randes ingest`` with a brand-new, empty ``PREFECT_HOME``, so the
  temporary server's first-start database migration runs on every CI run (it took 28 s
  on a 2-core machine, past Prefect's own 20 s limit, before `flows.prefect_session`);
- unreachable: every command that runs a flow exits 1 with one ``error:`` line and
  changes nothing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from randes.config import TransformConfig
from storage.groups import create_group
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

BUNDLE = "cold"
GROUP = "coldgroup"
RANDES = str(Path(sys.executable).with_name("randes"))


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def home(randes_home: Path, tmp_path: Path) -> Path:
    """A RANDES home with a base, bundle ``cold`` at version 1 and group ``coldgroup``."""
    home = randes_home
    base = save_base(tmp_path / "models" / "base")  # BERT, by transformers' save_pretrained
    first = save_finetune(base, tmp_path / "models" / "first", 1)
    save_finetune(base, tmp_path / "incoming" / "second", 2, dtype="bfloat16")
    with Workspace.open() as ws:
        ws.init()
        ws.add_base("b", str(base))
        ws.create_bundle(BUNDLE, "b", TransformConfig())
        create_group(ws, GROUP, "b", TransformConfig())
        ws.fold(BUNDLE, str(first), "first")
    return home


def run(argv: list[str], env: dict[str, str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RANDES, *argv], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def child_env(home: Path, prefect_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANDES_", "PREFECT_"))}
    env.update(
        RANDES_HOME=str(home),
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        COLUMNS="200",
        **extra,
    )
    return env


def versions(home: Path) -> list[int]:
    with Workspace.open() as ws:
        return [v.version for v in ws.registry.list_versions(BUNDLE)]


def test_cold_prefect_home_ingest(home: Path, tmp_path: Path) -> None:
    """The first flow on a machine: an empty PREFECT_HOME, Prefect's default start-up
    limit left to randes, no PREFECT_API_URL."""
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    assert not any(prefect_home.iterdir())
    result = run(
        ["ingest", BUNDLE, str(tmp_path / "incoming"), "--no-validate"],
        child_env(home, prefect_home),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "folded 1" in result.stdout and "version 2" in result.stdout
    assert versions(home) == [1, 2]
    assert any(prefect_home.iterdir())  # Prefect's own database was created there


@pytest.mark.parametrize(
    "argv",
    [
        ["ingest", BUNDLE, "{incoming}"],
        ["validate", BUNDLE],
        ["ingest", "--group", GROUP, "{incoming}"],
        ["group", "ingest", GROUP, "{incoming}"],
        ["demo"],
    ],
    ids=["ingest", "validate", "ingest-group", "group-ingest", "demo"],
)
def test_unreachable_prefect_api_is_one_error_line(
    home: Path, tmp_path: Path, argv: list[str]
) -> None:
    url = f"http://user:hunter2secret@127.0.0.1:{closed_port()}/api"
    argv = [a.format(incoming=tmp_path / "incoming") for a in argv]
    result = run(argv, child_env(home, tmp_path / "prefect-home", PREFECT_API_URL=url))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "cannot reach the Prefect API" in lines[0] and "prefect server start" in lines[0]
    assert "hunter2secret" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert versions(home) == [1]  # nothing folded, nothing validated
    with Workspace.open() as ws:
        assert ws.registry.group_members(GROUP) == []
        assert ws.registry.evaluations(BUNDLE, 1) == []


def test_startup_timeout_is_one_error_line(home: Path, tmp_path: Path) -> None:
    """A temporary server that cannot come up in time (a 1 s limit on a cold home): one
    line that says what to do, never Prefect's traceback."""
    result = run(
        ["ingest", BUNDLE, str(tmp_path / "incoming")],
        child_env(
            home, tmp_path / "prefect-home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"
        ),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "did not start within 1 s" in lines[0] and "PREFECT_API_URL" in lines[0]
    assert versions(home) == [1]
