"""Credentials never appear in output, errors, logs or Prefect's records.

The pipeline runs against the real services with distinctive secrets: SeaweedFS with
the session server's random access key id and secret key (exported as the boto3 chain
expects), and PostgreSQL through a role whose password exists only in this test
(scram-sha-256 for that role on the embedded server's socket). Every test records all
that could carry a secret and greps it:

- the commands' stdout and stderr (``flows.cli.main`` in-process),
- every log record at DEBUG, from the project and from botocore, urllib3, s3transfer,
  SQLAlchemy (engine and pool: SQL and its parameters) and psycopg,
- for the flows (under a Prefect API server): every artifact, every log line the API
  received, every flow and task run's parameters and state message.

Paths covered: ``randes init`` (it prints the registry URL: the password must show as
``***``, also when given as a ``?password=`` query parameter), base add, bundle
create, fold, pull, materialize, the registry queries, the ingest and validate flows;
and the failures: S3 unreachable (nothing listening on the endpoint), a wrong secret
key, an unknown access key id, a wrong database password (`DatabaseUnavailableError`),
and failed flow runs for each.

botocore's DEBUG wire log prints each request's ``Authorization`` header, which names
the access key id: `storage.redact.RedactS3Credentials` rewrites it, and a test checks
that the wire log was captured (so the grep saw it) and shows ``Credential=***``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from flows.cli import main
from tests.hf_models import save_base, save_finetune

BUNDLE = "creds"
BASE = "tiny"

DEBUG_LOGGERS = (
    "",
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "sqlalchemy",
    "sqlalchemy.engine",
    "sqlalchemy.pool",
    "psycopg",
    "storage",
    "flows",
    "randes",
    "alembic",
)


# ------------------------------------------------------------------- services
@dataclass
class Secrets:
    access_key: str
    secret_key: str
    db_password: str
    env: dict[str, str]  # RANDES_* for a working pipeline on S3 + PostgreSQL
    db_url_query: str  # the same database, the password as a ?password= parameter
    root: Path
    outputs: list[str] = field(default_factory=list)

    @property
    def values(self) -> dict[str, str]:
        found = {
            "access key id": self.access_key,
            "secret key": self.secret_key,
            "database password": self.db_password,
        }
        found["database password (url-quoted)"] = quote(self.db_password, safe="")
        return found

    def assert_absent(self, text: str, where: str) -> None:
        # also with line breaks removed: a console may wrap a long line inside a secret
        for candidate in (text, text.replace("\n", "")):
            for what, value in self.values.items():
                assert value not in candidate, (
                    f"{what} found in {where}: ...{_around(candidate, value)}..."
                )


def _around(text: str, value: str, width: int = 80) -> str:
    i = text.find(value)
    return text[max(0, i - width) : i + len(value) + width]


@contextlib.contextmanager
def _password_role(server: Any, password: str) -> Iterator[tuple[str, str]]:
    """A role and database reachable only with ``password`` (scram-sha-256 for that role)."""
    import psycopg

    role = f"leak_{uuid.uuid4().hex[:10]}"
    database = f"db_{role}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f'CREATE DATABASE "{database}" OWNER {role}')
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])  # type: ignore[index]
        original = hba.read_text()
        hba.write_text(f"local all {role} scram-sha-256\n{original}")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield role, database
    finally:
        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture(scope="module")
def creds(
    s3_server: Any, postgres_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secrets]:
    if not s3_server.running:
        s3_server.start()
    # '@', '%' and '/' must be quoted in a URL: the grep looks for both spellings
    password = f"Pg@Leak%Probe/{secrets.token_hex(8)}"
    socket_dir = postgres_server.get_postmaster_info().socket_dir
    assert socket_dir is not None
    host = quote(str(socket_dir), safe="")
    root = tmp_path_factory.mktemp("credentials")
    with _password_role(postgres_server, password) as (role, database):
        url = f"postgresql+psycopg://{role}:{quote(password, safe='')}@/{database}?host={host}"
        query = (
            f"postgresql+psycopg://{role}@/{database}?host={host}"
            f"&password={quote(password, safe='')}"
        )
        env = {
            "RANDES_HOME": str(root / "home"),
            "RANDES_DATABASE_URL": url,
            "RANDES_STORE_URL": f"s3://{s3_server.new_bucket('creds')}/randes",
            "RANDES_S3_ENDPOINT_URL": s3_server.endpoint_url,
            "RANDES_S3_RETRY_SECONDS": "1",
        }
        yield Secrets(s3_server.access_key, s3_server.secret_key, password, env, query, root)


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """A Prefect API server: the session's (tests/pipeline) when it is up, else our own."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        yield
        return
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def pipeline_env(creds: Secrets, monkeypatch: pytest.MonkeyPatch) -> Secrets:
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    for name, value in creds.env.items():
        monkeypatch.setenv(name, value)
    return creds


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every logger that could see a secret, at DEBUG, captured."""
    for name in DEBUG_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name or None)
    return caplog


def cli(creds: Secrets, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    creds.outputs += [out.getvalue(), err.getvalue()]
    return code, out.getvalue(), err.getvalue()


def _one_error_line(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    assert code == 1 and "Traceback" not in out + err, result
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _dead_endpoint() -> str:
    """A loopback URL where nothing listens (what a stopped S3 server looks like)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def models(creds: Secrets) -> dict[str, Path]:
    """A tiny bare BertModel and sequence classifiers trained from it, all saved by
    transformers' ``save_pretrained``."""
    base = save_base(creds.root / "models" / "base")
    return {
        "base": base,
        "alpha": save_finetune(base, creds.root / "models" / "alpha", 1),
        "delta": save_finetune(base, creds.root / "models" / "delta", 4),
        "incoming": creds.root / "incoming",
    }


# ---------------------------------------------------------------------- tests
def test_init_prints_the_database_url_with_the_password_hidden(
    pipeline_env: Secrets, monkeypatch: pytest.MonkeyPatch, debug_logs: pytest.LogCaptureFixture
) -> None:
    creds = pipeline_env
    code, out, err = cli(creds, "init")
    assert code == 0, (out, err)
    assert "registry: postgresql+psycopg://" in out and ":***@" in out, out

    monkeypatch.setenv("RANDES_DATABASE_URL", creds.db_url_query)
    code, out, err = cli(creds, "init")
    assert code == 0, (out, err)
    assert "password=" in out and "%2A%2A%2A" in out, out  # '***', url-quoted

    creds.assert_absent("".join(creds.outputs), "the output of randes init")
    creds.assert_absent(debug_logs.text, "the logs of randes init")


def test_commands_and_their_failures_leak_nothing(
    pipeline_env: Secrets,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    creds = pipeline_env
    creds.outputs.clear()
    assert cli(creds, "init")[0] == 0
    for argv in (
        ["base", "add", BASE, str(models["base"])],
        ["bundle", "create", BUNDLE, "--base", BASE],
        ["fold", BUNDLE, str(models["alpha"]), "--task", "alpha"],
        ["pull", BUNDLE, str(tmp_path / "pulled")],
        ["materialize", BUNDLE, "alpha", str(tmp_path / "model")],
        ["tasks", BUNDLE, "--json"],
        ["versions", BUNDLE, "--json"],
    ):
        code, out, err = cli(creds, *argv)
        assert code == 0, (argv, out, err)

    # The S3 server gone (nothing listens on its endpoint any more)
    with monkeypatch.context() as mp:
        mp.setenv("RANDES_S3_ENDPOINT_URL", _dead_endpoint())
        _one_error_line(cli(creds, "pull", BUNDLE, str(tmp_path / "p1")), "unavailable")
        _one_error_line(
            cli(creds, "fold", BUNDLE, str(models["delta"]), "--task", "delta"), "unavailable"
        )
    # A wrong secret key, an unknown access key id
    with monkeypatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + creds.secret_key)
        _one_error_line(cli(creds, "pull", BUNDLE, str(tmp_path / "p2")), "access denied")
    with monkeypatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", creds.access_key + "X")
        _one_error_line(cli(creds, "pull", BUNDLE, str(tmp_path / "p3")), "access denied")
    # A wrong database password, in the user info and as a query parameter
    wrong = creds.env["RANDES_DATABASE_URL"].replace(
        quote(creds.db_password, safe=""), quote("x" + creds.db_password, safe="")
    )
    wrong_query = creds.db_url_query.replace(
        quote(creds.db_password, safe=""), quote("x" + creds.db_password, safe="")
    )
    for url in (wrong, wrong_query):
        with monkeypatch.context() as mp:
            mp.setenv("RANDES_DATABASE_URL", url)
            line = _one_error_line(cli(creds, "versions", BUNDLE), "unavailable")
            assert "password authentication failed" in line
            _one_error_line(cli(creds, "init"), "unavailable")
            _one_error_line(cli(creds, "pull", BUNDLE, str(tmp_path / "p4")), "unavailable")

    creds.assert_absent("\n".join(creds.outputs), "command output")
    creds.assert_absent(debug_logs.text, "the DEBUG logs")
    # the grep saw botocore's wire log, where the access key id would be
    wire = [r.getMessage() for r in debug_logs.records if r.name == "botocore.endpoint"]
    assert any("Credential=***" in m for m in wire), wire[:3]
    # and SQLAlchemy's, with the SQL the commands ran
    assert any(r.name.startswith("sqlalchemy.engine") for r in debug_logs.records)


def _prefect_records(flow_run_ids: list[uuid.UUID]) -> str:
    """Artifacts, logs, flow and task runs of these flow runs, as one JSON text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send what is queued, and wait
    runs_filter = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30
        while True:  # logs reach the API asynchronously
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids))
            )
            if {log.flow_run_id for log in logs} >= set(flow_run_ids):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids))
        )
        flow_runs = client.read_flow_runs(flow_run_filter=runs_filter)
        task_runs = client.read_task_runs(flow_run_filter=runs_filter)
        states = [s for run in flow_runs for s in client.read_flow_run_states(run.id)]
    assert artifacts, "the ingest and validate flows record artifacts"
    assert logs, "the flows' logs reached the API"
    dump = {
        "artifacts": [a.model_dump(mode="json") for a in artifacts],
        "logs": [log.model_dump(mode="json") for log in logs],
        "flow_runs": [r.model_dump(mode="json") for r in flow_runs],
        "task_runs": [r.model_dump(mode="json") for r in task_runs],
        "states": [s.model_dump(mode="json", exclude={"data"}) for s in states],
    }
    return json.dumps(dump)


@pytest.mark.usefixtures("prefect_api")
def test_flows_their_artifacts_and_their_failures_leak_nothing(
    pipeline_env: Secrets,
    models: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    debug_logs: pytest.LogCaptureFixture,
) -> None:
    from flows.pipeline import ingest_flow, validate_flow

    creds = pipeline_env
    creds.outputs.clear()
    assert cli(creds, "init")[0] == 0
    bundle = "flows"
    with contextlib.suppress(Exception):  # the previous test may have added the base
        cli(creds, "base", "add", BASE, str(models["base"]))
    assert cli(creds, "bundle", "create", bundle, "--base", BASE)[0] == 0
    incoming = models["incoming"]
    for i, task in enumerate(("beta", "gamma")):
        save_finetune(models["base"], incoming / task, 10 + i)

    runs: list[uuid.UUID] = []
    state = ingest_flow(bundle, str(incoming), return_state=True)
    assert state.is_completed(), state
    summary = state.result()
    assert summary["folded"] == ["beta", "gamma"] and summary["status"] == "validated"
    runs.append(state.state_details.flow_run_id)

    # failed runs: S3 unreachable, a wrong secret, a wrong database password
    failures = {
        "RANDES_S3_ENDPOINT_URL": _dead_endpoint(),
        "AWS_SECRET_ACCESS_KEY": "wrong-" + creds.secret_key,
        "RANDES_DATABASE_URL": creds.env["RANDES_DATABASE_URL"].replace(
            quote(creds.db_password, safe=""), quote("x" + creds.db_password, safe="")
        ),
    }
    for name, value in failures.items():
        with monkeypatch.context() as mp:
            mp.setenv(name, value)
            failed = validate_flow(bundle, None, None, None, return_state=True)
        assert failed.is_failed(), (name, failed)
        runs.append(failed.state_details.flow_run_id)
        creds.outputs.append(str(failed.message))

    creds.assert_absent(_prefect_records(runs), "Prefect's records of the runs")
    creds.assert_absent("\n".join(creds.outputs), "command output and run states")
    creds.assert_absent(debug_logs.text, "the DEBUG logs")


@pytest.mark.usefixtures("prefect_api")
def test_flow_failure_with_the_password_in_the_query_string(
    pipeline_env: Secrets, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.pipeline import validate_flow

    creds = pipeline_env
    wrong = creds.db_url_query.replace(
        quote(creds.db_password, safe=""), quote("x" + creds.db_password, safe="")
    )
    monkeypatch.setenv("RANDES_DATABASE_URL", wrong)
    failed = validate_flow("flows", None, None, None, return_state=True)
    assert failed.is_failed(), failed
    creds.assert_absent(str(failed.message), "a failed flow run's state message")
