"""Shared machinery of the reliability tests: commands run in pre-imported child
processes that a test can kill or freeze at named points, the checks run after every
fault, and the trial counter behind docs/reliability.md.

Children
    `start_cli` runs ``randes ARGV`` (`flows.cli.main`) in a process forked from a
    forkserver that already imported torch and the pipeline (the harness of
    tests/pipeline/test_faults.py), so a kill delay lands in the command itself, not in
    interpreter start-up. Its stdout and stderr go to separate files, so a test can hold
    stderr to the "one line per error" contract. ``point`` arms the child before the
    command runs: ``ACTION@HOOK[#N]`` makes it SIGKILL itself (``die``) or SIGSTOP
    itself (``stop``: the test then changes the world and sends SIGCONT) before or
    after the N-th call of the hooked function (`HOOKS`), or at the named special points
    (`_arm_special`). ``rlimit-fsize=BYTES`` caps the size of any file it writes.

Checks
    `recover_and_check` is what follows every fault of a fold: nothing partial visible,
    every visible version materializes and pulls, every orphan is leased, the retry
    completes (or reports skipped), and once the leases expire `gc` removes exactly the
    orphans, plus every temp file and work directory a dead writer left.

Counting
    `trials` records what a test tried and what was lost (always nothing, or the test
    fails). With ``RELIABILITY_SUMMARY=path`` set, each record is appended to that JSON
    lines file; docs/reliability.md's table is built from it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from storage.settings import Settings
from storage.workspace import Workspace
from tests.pipeline.test_faults import (
    BASE,
    BUNDLE,
    CONFIG,
    Models,
    _check_visible,
    _expire_leases,
    _settings,
    _setup,
    _stored_keys,
    _warm_forkserver,
    build_models,
    version_1_home,
)

__all__ = [
    "BASE",
    "BUNDLE",
    "CONFIG",
    "Models",
    "check_visible",
    "expire_leases",
    "make_settings",
    "setup_bundle",
    "stored_keys",
    "version_1_home",
    "warm_forkserver",
]

check_visible = _check_visible
expire_leases = _expire_leases
make_settings = _settings
warm_forkserver = _warm_forkserver  # a process has one forkserver, whoever starts it
setup_bundle = _setup
stored_keys = _stored_keys

SUMMARY_ENV = "RELIABILITY_SUMMARY"
STAMPS_ENV = "RELIABILITY_STAMPS"

_CTX = multiprocessing.get_context("forkserver")
# The forkserver is process-wide and keeps the preload list set last before it starts:
# this conftest is collected after tests/pipeline, so it names their modules too.
_CTX.set_forkserver_preload(
    [
        "torch",
        "storage.workspace",
        "flows.cli",
        "tests.pipeline.test_faults",
        "tests.pipeline.test_concurrency",
        __name__,
    ]
)


# ---------------------------------------------------------------- child arming
# hook name -> (module, attribute path, before|after, default N)
HOOKS: dict[str, tuple[str, str, str, int]] = {
    "compute-start": ("storage.folding", "fold", "before", 1),
    "after-lease": ("storage.registry", "Registry.lease", "after", 1),
    "after-manifest-lease": ("storage.registry", "Registry.lease", "after", 2),
    "mid-store-write": ("storage.store.local", "publish_no_replace", "before", 1),
    "after-first-upload": ("storage.store.local", "LocalStore.put_file", "after", 1),
    "after-first-upload-s3": ("storage.store.s3", "S3Store.put_file", "after", 1),
    "before-manifest": ("storage.commit", "put_manifest", "before", 1),
    "before-commit": ("storage.registry", "Registry.commit_version", "before", 1),
    "after-commit": ("storage.registry", "Registry.commit_version", "after", 1),
    "after-release": ("storage.registry", "Registry.release", "after", 1),
    "before-add-base": ("storage.registry", "Registry.add_base", "before", 1),
    "gc-list": ("storage.store.local", "LocalStore.list", "before", 1),
    "gc-after-delete": ("storage.store.local", "LocalStore.delete", "after", 1),
    "s3-get-file": ("storage.store.s3", "S3Store.get_file", "after", 1),
    "s3-upload-part": ("storage.store.s3", "S3Store._part_uploaded", "after", 1),
}
SPECIAL = ("mid-compute", "mid-commit", "mid-cache-copy")


def _act(action: str, hook: str = "") -> None:
    if action == "stamp":  # note when the point was reached (CLOCK_MONOTONIC is system-wide)
        with open(os.environ[STAMPS_ENV], "a", encoding="utf-8") as handle:
            handle.write(f"{hook} {time.monotonic()}\n")
    elif action == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "stop":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSTOP)  # the test sends SIGCONT
    else:
        raise ValueError(action)


def _resolve(module: str, path: str) -> tuple[Any, str]:
    import importlib

    owner: Any = importlib.import_module(module)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    return owner, name


def _wrap(module: str, path: str, when: str, nth: int, action: str) -> None:
    owner, name = _resolve(module, path)
    original = getattr(owner, name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        hit = calls[0] == nth
        if hit and when == "before":
            _act(action, path)
        result = original(*args, **kwargs)
        if hit and when == "after":
            _act(action, path)
        return result

    setattr(owner, name, wrapper)


def _arm_special(hook: str, action: str) -> None:
    if hook == "mid-compute":  # half the tensors computed, shards half written
        import storage.folding as folding

        core_fold = folding.fold

        def fold_then_act(*args: Any, **kwargs: Any) -> Any:
            fired = [False]

            def progress(done: int, total: int) -> None:
                if not fired[0] and total and done * 2 >= total:
                    fired[0] = True
                    _act(action)

            kwargs["progress"] = progress
            return core_fold(*args, **kwargs)

        folding.fold = fold_then_act  # type: ignore[assignment]
    elif hook == "mid-commit":  # inside the registry transaction, rows half inserted
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def before_execute(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
            if statement.lstrip().upper().startswith("INSERT INTO BUNDLE_VERSIONS"):
                _act(action)

        event.listen(Engine, "before_cursor_execute", before_execute)
    elif hook == "mid-cache-copy":  # a download into the cache, half copied
        import storage.store.local as local

        copy = local.copy_hashing

        def copy_some_then_act(src: Any, dst: Any) -> tuple[str, int]:
            dst.write(src.read(256 * 1024))
            dst.flush()
            _act(action)
            return copy(src, dst)

        local.copy_hashing = copy_some_then_act  # type: ignore[assignment]
    else:
        raise ValueError(hook)


def arm(point: str) -> None:
    """Arm this process: ``ACTION@HOOK[#N]`` or ``rlimit-fsize=BYTES``."""
    if point.startswith("rlimit-fsize="):
        import resource

        limit = int(point.split("=", 1)[1])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return
    action, _, rest = point.partition("@")
    hook, _, count = rest.partition("#")
    if hook in SPECIAL:
        _arm_special(hook, action)
        return
    module, path, when, nth = HOOKS[hook]
    _wrap(module, path, when, int(count) if count else nth, action)


def _cli_child(env: dict[str, str], argv: list[str], logs: tuple[str, str], point: str) -> None:
    """`randes ARGV` in this (forked, pre-imported) process."""
    for fd, log in ((1, logs[0]), (2, logs[1])):
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    # The forkserver kept the environment of whichever test started it.
    for name in [n for n in os.environ if n.startswith(("RANDES_", "AWS_"))]:
        del os.environ[name]
    os.environ.update(env)
    for item in filter(None, point.split(",")):
        arm(item)
    from flows.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class Child:
    proc: Any
    stdout_path: Path
    stderr_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def join(self, timeout: float = 180.0) -> int | None:
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.kill()
            raise AssertionError(f"child did not finish in {timeout:.0f}s: {self.output()}")
        return self.proc.exitcode  # type: ignore[no-any-return]

    def kill(self) -> None:
        """SIGKILL the child if it is still running (never a reaped pid: it may be reused)."""
        if self.proc.exitcode is None and self.proc.is_alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.join(30)

    def stopped(self) -> bool:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def wait_stopped(self, timeout: float = 180.0) -> None:
        """Wait until the child froze itself at its ``stop@`` point."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stopped():
                return
            if not self.proc.is_alive():
                raise AssertionError(f"child exited before its stop point: {self.output()}")
            time.sleep(0.01)
        self.kill()
        raise AssertionError(f"child never reached its stop point: {self.output()}")

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return f"stdout={self.stdout!r} stderr={self.stderr!r}"


def start_cli(env: dict[str, str], argv: list[str], logdir: Path, point: str = "") -> Child:
    """``randes ARGV`` in a forked child, armed at ``point`` (see the module docstring)."""
    logdir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    logs = (logdir / f"{tag}.out", logdir / f"{tag}.err")
    proc = _CTX.Process(
        target=_cli_child, args=(env, argv, (str(logs[0]), str(logs[1])), point), daemon=True
    )
    child = Child(proc, *logs)
    proc.start()
    return child


def run_cli(
    env: dict[str, str], argv: list[str], logdir: Path, point: str = "", timeout: float = 180
) -> Child:
    child = start_cli(env, argv, logdir, point)
    child.join(timeout)
    return child


def fold_argv(models: Models, task: str) -> list[str]:
    return ["fold", BUNDLE, str(models.tasks[task]), "--task", task]


def assert_one_error_line(child: Child, *needles: str) -> str:
    """The contract for a failed command: exit 1, one ``error: ...`` line on stderr."""
    err = child.stderr
    assert child.proc.exitcode == 1, child.output()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), child.output()
    assert "Traceback" not in err + child.stdout, child.output()
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """The base and four fine-tunes of tests/pipeline/test_faults.py (same sizes)."""
    return build_models(tmp_path_factory.mktemp("reliability-models"))


@pytest.fixture
def no_randes_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RANDES_* of the developer's shell reaches the test process."""
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)


@dataclass
class Trials:
    """What one test tried and lost; appended to $RELIABILITY_SUMMARY when set."""

    nodeid: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def record(self, category: str, what: str, *, tried: int = 1, lost: int = 0) -> None:
        assert lost == 0, f"{category}: {what}: lost {lost}"
        entry = {"test": self.nodeid, "category": category, "what": what, "tried": tried}
        entry["lost"] = lost
        self.records.append(entry)


_SUMMARY_OPENED: list[str] = []  # the summary file is truncated once per test run


@pytest.fixture
def trials(request: pytest.FixtureRequest) -> Iterator[Trials]:
    log = Trials(request.node.nodeid)
    yield log
    path = os.environ.get(SUMMARY_ENV)
    failed = getattr(request.node, "rep_call", None)
    if path and log.records and not (failed is not None and failed.failed):
        mode = "a" if path in _SUMMARY_OPENED else "w"
        _SUMMARY_OPENED.append(path)
        with open(path, mode, encoding="utf-8") as handle:
            for entry in log.records:
                handle.write(json.dumps(entry) + "\n")


def summarize(path: str | Path) -> list[tuple[str, int, int, int]]:
    """(category, tests, trials, lost) per category of a summary file, in file order."""
    totals: dict[str, list[Any]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        row = totals.setdefault(entry["category"], [set(), 0, 0])
        row[0].add(entry["test"])
        row[1] += int(entry["tried"])
        row[2] += int(entry["lost"])
    return [(name, len(tests), tried, lost) for name, (tests, tried, lost) in totals.items()]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    path = os.environ.get(SUMMARY_ENV)
    if not path or not _SUMMARY_OPENED or not Path(path).exists():
        return
    terminalreporter.section("reliability trials")
    terminalreporter.write_line(f"{'category':<58} {'tests':>5} {'tried':>6} {'lost':>5}")
    for name, tests, tried, lost in summarize(path):
        terminalreporter.write_line(f"{name:<58} {tests:>5} {tried:>6} {lost:>5}")
    terminalreporter.write_line(f"(records in {path})")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# --------------------------------------------------------- after-fault checks
@dataclass
class Recovery:
    committed: bool
    orphans: int
    swept: int
    deleted: int
    retried_version: int
    skipped: bool


def tmp_files(root: Path | None) -> list[Path]:
    if root is None or not root.exists():
        return []
    return sorted(root.rglob(".tmp-*"))


def store_root(ws: Workspace) -> Path | None:
    root = getattr(ws.store, "root", None)
    return Path(root) if root is not None else None


def recover_and_check(
    *,
    settings: Settings,
    models: Models,
    task: str,
    head_before: int,
    scratch: Path,
    recomputed: set[str],
    leased_orphans: bool = True,
    retry: Callable[[Workspace], Any] | None = None,
) -> Recovery:
    """After a fault that interrupted ``randes fold ... --task TASK``:

    1. nothing partial is visible: the head is the old version or the complete new one,
       and every visible version is one whole fold on its parent (recomputed byte for
       byte), materializes every task and pulls with every sha256 verified;
    2. every orphan the run left is leased (``leased_orphans``: a run that could still
       release its leases left none), so a `gc` now deletes no object;
    3. the retry completes, or reports skipped when the run had committed;
    4. once the leases expire, `gc` deletes exactly the orphans that the retry did not
       reuse, and no temp file of the store or the cache and no work directory is left;
    5. every version is still complete in the store: pulled through an empty cache,
       every object verified.
    """
    scratch.mkdir(parents=True, exist_ok=True)
    with Workspace(settings) as ws:
        versions = check_visible(ws, models, scratch, recomputed)
        assert versions[-1] in (head_before, head_before + 1), versions
        committed = versions[-1] == head_before + 1
        ledger = ws.registry.ledger_lookup(BUNDLE, models.digests[task])
        assert ledger == ((task, head_before + 1) if committed else None)

        orphans = stored_keys(ws) - ws.registry.referenced_keys()
        if leased_orphans:
            assert orphans <= ws.registry.leased_keys(), "an orphan was stored without a lease"
            first = ws.gc(grace_s=0)
            assert first.deleted == [], first
            swept = first.swept
        else:
            swept = 0

        retry = retry or (lambda ws: ws.fold(BUNDLE, str(models.tasks[task]), task))
        outcome = retry(ws)
        assert (outcome.task, outcome.version) == (task, head_before + 1)
        assert outcome.skipped == committed
        assert ws.registry.head(BUNDLE).version == head_before + 1  # type: ignore[union-attr]

        expire_leases(settings.resolved_database_url)
        report = ws.gc(grace_s=0)
        referenced = ws.registry.referenced_keys()
        assert set(report.deleted) == orphans - referenced, (report.deleted, orphans)
        assert stored_keys(ws) == referenced
        assert ws.registry.leased_keys() == set()
        assert tmp_files(store_root(ws)) == [], tmp_files(store_root(ws))
        assert tmp_files(ws.cache.root) == [], tmp_files(ws.cache.root)
        work = sorted(p.name for p in ws.work_root.iterdir()) if ws.work_root.exists() else []
        assert work == [], work
        swept += report.swept

    check_store_complete(settings, scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    return Recovery(
        committed=committed,
        orphans=len(orphans),
        swept=swept,
        deleted=len(report.deleted),
        retried_version=outcome.version,
        skipped=outcome.skipped,
    )


def check_store_complete(settings: Settings, scratch: Path) -> list[int]:
    """Every version (and its base) is complete in the store itself, read through an
    empty cache: `pull` fetches every object from the store and verifies its sha256."""
    fresh = settings.model_copy(update={"cache_dir": scratch / f"fresh-{uuid.uuid4().hex[:6]}"})
    with Workspace(fresh) as ws:
        versions = [r.version for r in ws.registry.list_versions(BUNDLE)]
        for version in versions:
            dest = scratch / f"pull-{version}-{uuid.uuid4().hex[:6]}"
            assert ws.pull(BUNDLE, str(version), dest).version == version
            shutil.rmtree(dest)
    return versions


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child's `Workspace.open()` equal ``settings``."""
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env["RANDES_HOME"] = str(settings.home)
    env["RANDES_DATABASE_URL"] = settings.resolved_database_url
    env["RANDES_STORE_URL"] = settings.resolved_store_url
    env["RANDES_CACHE_DIR"] = str(settings.resolved_cache_dir)
    if settings.s3_endpoint_url:
        env["RANDES_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.s3_retry_seconds:
        env["RANDES_S3_RETRY_SECONDS"] = str(settings.s3_retry_seconds)
    return env
