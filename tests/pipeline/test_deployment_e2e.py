"""End to end: the scheduled-ingestion deployment of ``prefect.yaml``, run by a real worker.

A real Prefect server (``prefect server start``, SQLite, its own PREFECT_HOME) is started
for this module on a free loopback port. The test deploys ``scheduled-ingest`` from the
repository's ``prefect.yaml`` with ``prefect deploy`` (parameters overridden to point at a
temporary registry and an S3 prefix of two fine-tunes), triggers a run with
``prefect deployment run``, executes it with ``prefect worker start --run-once`` started
*outside* the repository (so the deployment's pull step is what puts the flow run in the
project directory), and finally reads the registry: two tasks, head version validated.

The fine-tunes are what a user's training jobs leave behind: tiny BERT classifiers saved
by transformers' ``save_pretrained`` (one in fp32, one in bf16 over the fp32 base),
uploaded with boto3 to ``s3://<bucket>/incoming/<task>/`` on the test SeaweedFS; the
worker reaches that server with the usual AWS variables and ``RANDES_S3_ENDPOINT_URL``.

Every command runs as a subprocess with an explicit environment: no PREFECT_* or RANDES_*
setting of the calling shell leaks in, analytics are off, and prompts are disabled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from randes.config import TransformConfig
from storage.registry import Registry
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune
from tests.services.seaweed import SeaweedServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
POOL = "randes-process"
DEPLOYMENT = "ingest/scheduled-ingest"
BUNDLE = "e2e-bundle"

# Generous: colleagues' benchmarks load this machine; an idle one needs a fraction.
SERVER_START_S = 240
COMMAND_S = 240
WORKER_S = 360


def _prefect_executable() -> str:
    """The `prefect` console script of the interpreter running the tests."""
    candidate = Path(sys.executable).parent / "prefect"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("prefect")
    if found is None:
        pytest.skip("the prefect command line is not installed")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_environment() -> dict[str, str]:
    """The caller's environment without any Prefect or RanDeS setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RANDES_"))}
    # Make the venv's console scripts and interpreter the ones found on PATH as well.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_CLI_PROMPT": "false",
        "PYTHONUNBUFFERED": "1",
    }
    return env


@dataclass
class PrefectServer:
    api_url: str
    env: dict[str, str]  # what every client subprocess (CLI, worker) runs with
    log: Path
    process: subprocess.Popen[bytes]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api_url}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read() or b"null")


# The server runs under a small sh guard holding the read end of a pipe whose write end
# only this test process holds: if the test process dies without its teardown (even by
# SIGKILL), the pipe closes and the guard terminates the server's whole process group.
_GUARD = r"""
exec 3<&0
"$@" </dev/null &
pid=$!
( read -r _ <&3; kill -TERM 0 ) &
watcher=$!
exec 3<&-
wait "$pid"
rc=$?
kill "$watcher" 2>/dev/null
exit $rc
"""


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"prefect server exited with {process.returncode}:\n"
                + log.read_text(errors="replace")[-4000:]
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"prefect server not healthy after {SERVER_START_S}s:\n"
        + log.read_text(errors="replace")[-4000:]
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server and every process it started (its own process group)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    # uvicorn or service children may outlive the leader: kill whatever is left of the group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=30)
    if process.stdin is not None:
        with contextlib.suppress(OSError):
            process.stdin.close()


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    root = tmp_path_factory.mktemp("prefect-server")
    home = root / "prefect-home"
    home.mkdir()
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_env = _clean_environment() | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # The test triggers its run by hand: no cron-scheduled run of the deployment may
        # appear next to it (a run at hh:00 would otherwise be picked up by the worker).
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    log = root / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                _GUARD,
                "prefect-server-guard",
                _prefect_executable(),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=root,
            env=server_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE,  # the guard's lifeline: EOF when this process dies
            start_new_session=True,  # its own process group, stopped as a whole
        )
    try:
        _wait_healthy(api_url, process, log)
        client_env = _clean_environment() | {"PREFECT_HOME": str(home), "PREFECT_API_URL": api_url}
        yield PrefectServer(api_url=api_url, env=client_env, log=log, process=process)
    finally:
        _stop(process)


def _prefect(
    server: PrefectServer,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = COMMAND_S,
) -> str:
    """Run one `prefect` command; fail the test with its output if it fails."""
    try:
        done = subprocess.run(
            [_prefect_executable(), *args],
            cwd=cwd,
            env=env or server.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            text=True,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode()
        pytest.fail(f"prefect {' '.join(args)} timed out after {timeout}s:\n{output[-4000:]}")
    if done.returncode != 0:
        pytest.fail(
            f"prefect {' '.join(args)} exited with {done.returncode}:\n{done.stdout[-4000:]}"
            f"\n--- server log ---\n{server.log_tail(2000)}"
        )
    return done.stdout


def _upload(s3: SeaweedServer, bucket: str, prefix: str, folder: Path) -> None:
    """Every file of ``folder`` under ``prefix/``, as ``aws s3 cp --recursive`` would."""
    client = s3.client()
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _prepare_registry(root: Path, s3: SeaweedServer) -> tuple[Path, str]:
    """A RANDES_HOME with a base and an empty bundle, and an S3 source of two task
    folders (the fine-tunes as saved by transformers, uploaded with boto3)."""
    models = root / "models"
    base = save_base(models / "base")
    trained = {
        "alpha": save_finetune(base, models / "alpha", 1),
        "beta": save_finetune(base, models / "beta", 2, dtype="bfloat16"),
    }
    bucket = s3.new_bucket("e2e-src")
    for task, folder in trained.items():
        _upload(s3, bucket, f"incoming/{task}", folder)
    home = root / "randes-home"
    settings = Settings(home=home, database_url=None, store_url=None, cache_dir=None)
    with Workspace(settings) as ws:
        ws.init()
        ws.add_base("tiny", str(base))
        ws.create_bundle(BUNDLE, "tiny", TransformConfig())  # no gate: validated if it retrieves
    return home, f"s3://{bucket}/incoming"


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_scheduled_ingest_deployment_runs_on_a_real_worker(
    prefect_server: PrefectServer, s3_server: SeaweedServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    if not s3_server.running:  # a previous test stopped it and failed before restarting
        s3_server.start()
    randes_home, incoming = _prepare_registry(tmp_path, s3_server)

    # 1. the work pool the deployments of prefect.yaml name
    _prefect(prefect_server, "work-pool", "create", POOL, "--type", "process", cwd=tmp_path)

    # 2. deploy from the repository's prefect.yaml, pointing the deployment at our data
    _prefect(
        prefect_server,
        "--no-prompt",
        "deploy",
        "--name",
        "scheduled-ingest",
        "--param",
        f"bundle={BUNDLE}",
        "--param",
        f"source={incoming}",
        cwd=REPO,
    )
    deployment = prefect_server.api("GET", f"/deployments/name/{DEPLOYMENT}")
    assert deployment["work_pool_name"] == POOL
    assert deployment["entrypoint"] == "flows/pipeline.py:ingest_flow"
    assert deployment["parameters"]["bundle"] == BUNDLE
    assert deployment["parameters"]["source"] == incoming
    assert deployment["parameters"].get("evaluator") is None
    crons = [s["schedule"].get("cron") for s in deployment["schedules"]]
    assert len(crons) == 1 and crons[0], deployment["schedules"]
    # the pull step recorded the project directory at deploy time
    assert deployment["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    ]

    # 3. trigger a run of the deployment, as its schedule would
    output = _prefect(prefect_server, "deployment", "run", DEPLOYMENT, cwd=tmp_path)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    run_id = match.group(1)

    # 4. a real process worker, started outside the repository with the registry and S3
    #    settings in its environment (a flow run inherits the worker's environment)
    worker_cwd = tmp_path / "worker"
    worker_cwd.mkdir()
    worker_env = (
        prefect_server.env
        | s3_server.env()
        | {"RANDES_HOME": str(randes_home), "RANDES_S3_ENDPOINT_URL": s3_server.endpoint_url}
    )
    state: dict[str, Any] = {}
    worker_logs = []
    for _ in range(3):  # a poll can come back empty on a slow machine: start it again
        worker_logs.append(
            _prefect(
                prefect_server,
                "worker",
                "start",
                "--pool",
                POOL,
                "--run-once",
                cwd=worker_cwd,
                env=worker_env,
                timeout=WORKER_S,
            )
        )
        state = prefect_server.api("GET", f"/flow_runs/{run_id}")["state"]
        if state["type"] != "SCHEDULED" and state["type"] != "PENDING":
            break

    # run-once returns when the run it submitted ends; wait a little for the final state
    deadline = time.monotonic() + 60
    while state["type"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
        state = prefect_server.api("GET", f"/flow_runs/{run_id}")["state"]
    worker_output = "\n".join(worker_logs)[-6000:]
    assert state["type"] == "COMPLETED", f"{state}\n--- worker ---\n{worker_output}"
    assert state["name"] == "Completed"
    assert "set_working_directory" in worker_output

    # 5. the registry the flow run wrote to
    settings = Settings(home=randes_home, database_url=None, store_url=None, cache_dir=None)
    with Registry(settings.resolved_database_url) as registry:
        tasks = registry.tasks(BUNDLE)
        assert sorted(t.name for t in tasks) == ["alpha", "beta"]
        assert len({t.seed for t in tasks}) == 2
        assert all(t.source_uri.startswith(f"{incoming}/{t.name}") for t in tasks), tasks
        head = registry.head(BUNDLE)
        assert head is not None and head.version == 1  # the run's checkpoints: one batch
        assert head.status == "validated"  # no gate on the bundle: validated
        assert [v.version for v in registry.list_versions(BUNDLE)] == [1]

    # the flow run's result artifacts are on the server too
    artifacts = prefect_server.api(
        "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}}
    )
    assert any(a.get("key") == f"{BUNDLE}-ingest" for a in artifacts), artifacts

    print(f"deployment e2e: {time.monotonic() - started:.1f}s after the server was up")
