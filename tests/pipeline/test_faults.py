"""Faults in the middle of a fold, against real servers: nothing half-written is ever visible.

- the S3 server stopped while `randes fold` uploads: one clear error line naming the
  endpoint (no credentials), the registry head unchanged; once the server is back, the
  same command completes;
- `randes fold` killed with SIGKILL at points spread over its whole run, and at the
  protocol's sharpest edges (after its first upload, just before and just after the
  registry commit), on the embedded default (local store + SQLite) and on S3 +
  PostgreSQL. After each kill: the head is the old version or the complete new one;
  every visible version is exactly what its manifest says (its superposition and the
  new task's private shards recomputed from the parent's, byte for byte); every task
  materializes and `pull` verifies; everything the dead run stored is under a lease, so
  a `gc` meanwhile deletes none of it; the retry completes (or reports skipped when the
  killed run had committed); and once the dead run's leases have expired, `gc` leaves
  exactly the referenced objects (every orphan gone, every version still complete when
  read back from the store through an empty cache) and no stale work directory.

The checkpoints are BERTs saved by transformers' ``save_pretrained`` (a bare
``BertModel`` base, sequence classifiers trained two steps from it, encoder under
``bert.``), sized so that a fold takes a moment.

Folds that get killed run `flows.cli.main([...])` in processes forked from a forkserver
that has torch and the pipeline already imported, so a kill delay lands in the fold
itself rather than in interpreter start-up; the outage test runs the `randes` script.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select, update

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import source_digest
from randes.fold import fold as core_fold
from randes.manifest import BundleManifest
from storage.registry.engine import make_engine
from storage.registry.models import ObjectLease
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

BUNDLE = "b"
BASE = "base"
# Big enough that a fold takes a moment and writes several 1 MiB shards, so that kills
# land in every phase: hashing the source, computing, uploading, committing (~1.3M
# parameters, as the GPT-2-shaped state dicts these tests used before).
SIZES = {"hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 4}
CONFIG = TransformConfig(max_shard_bytes=1024 * 1024)
KILL_FRACTIONS = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85)
KILL_POINTS = ("mid-upload", "before-commit", "after-commit")

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "storage.workspace", "flows.cli", __name__])


# ------------------------------------------------------------------- children
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_point: str) -> None:
    """Make this process SIGKILL itself at one exact point of the commit protocol."""
    from storage.registry import Registry
    from storage.store import LocalStore, S3Store

    commit = Registry.commit_version
    if kill_point == "mid-upload":  # the fold's first object is stored, the rest is not
        for cls in (LocalStore, S3Store):

            def put_then_die(self: Any, *args: Any, _put: Any = cls.put_file, **kw: Any) -> Any:
                _put(self, *args, **kw)
                _die()

            cls.put_file = put_then_die  # type: ignore[method-assign]
    elif kill_point == "before-commit":  # every object and the manifest are stored

        def die_before(self: Any, *args: Any, **kw: Any) -> Any:
            _die()

        Registry.commit_version = die_before  # type: ignore[method-assign]
    elif kill_point == "after-commit":  # visible; leases and work dir left behind

        def die_after(self: Any, *args: Any, **kw: Any) -> Any:
            commit(self, *args, **kw)
            _die()

        Registry.commit_version = die_after  # type: ignore[method-assign]
    else:
        raise ValueError(kill_point)


def _cli_child(env: dict[str, str], argv: list[str], log: str, kill_point: str | None) -> None:
    """`randes ARGV` in this (forked, pre-imported) process; its output goes to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # The forkserver kept the environment of whichever test started it.
    for name in [n for n in os.environ if n.startswith(("RANDES_", "AWS_"))]:
        del os.environ[name]
    os.environ.update(env)
    if kill_point is not None:
        _arm(kill_point)
    from flows.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _noop() -> None:
    pass


def _warm_forkserver() -> None:
    """Start the forkserver (it imports torch and the pipeline once) before timing anything."""
    proc = _CTX.Process(target=_noop, daemon=True)
    proc.start()
    proc.join(300)


def _start_fold(
    env: dict[str, str], source: Path, task: str, log: Path, kill_point: str | None = None
) -> Any:
    proc = _CTX.Process(
        target=_cli_child,
        args=(env, ["fold", BUNDLE, str(source), "--task", task], str(log), kill_point),
        daemon=True,
    )
    proc.start()
    return proc


# ------------------------------------------------------------------- fixtures
@dataclass
class Models:
    base: Path
    tasks: dict[str, Path]
    digests: dict[str, str]


def build_models(root: Path) -> Models:
    """A base and four fine-tunes big enough for a fold to take a measurable moment."""
    base = save_base(root / "base", **SIZES)
    tasks = {f"t{i}": save_finetune(base, root / f"t{i}", i) for i in range(4)}
    digests = {}
    for name, path in tasks.items():
        with CheckpointReader.open(path) as reader:
            digests[name] = source_digest(reader)
    return Models(base, tasks, digests)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    return build_models(tmp_path_factory.mktemp("fault-models"))


@pytest.fixture(autouse=True)
def _no_randes_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)


def _settings(home: Path, **overrides: Any) -> Settings:
    """Settings from arguments only (never from whatever RANDES_* a developer has set)."""
    fields: dict[str, Any] = {
        "home": home,
        "database_url": None,
        "store_url": None,
        "s3_endpoint_url": None,
        "s3_retry_seconds": None,
        "cache_dir": None,
    }
    return Settings(**(fields | overrides))


def _setup(ws: Workspace, models: Models, *folded: str) -> None:
    ws.init()
    ws.add_base(BASE, str(models.base))
    ws.create_bundle(BUNDLE, BASE, CONFIG)
    for task in folded:
        ws.fold(BUNDLE, str(models.tasks[task]), task)


# ------------------------------------------------------------------- checking
def _expire_leases(database_url: str) -> None:
    """What the passing of LEASE_TTL_S does to a dead fold's leases."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                update(ObjectLease).values(expires_at=dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
            )
    finally:
        engine.dispose()


def _stored_keys(ws: Workspace) -> set[str]:
    return {info.key for info in ws.store.list("")}


def _check_fold_step(
    ws: Workspace,
    manifest: BundleManifest,
    parent: BundleManifest | None,
    models: Models,
    scratch: Path,
) -> None:
    """The version is its parent plus one whole fold: recompute that fold, byte for byte."""
    assert manifest.parent_version == (parent.version if parent else None)
    added = [t for t in manifest.tasks if t.added_in_version == manifest.version]
    assert len(added) == 1, manifest.tasks
    entry = added[0]
    before = [t.name for t in parent.tasks] if parent else []
    assert [t.name for t in manifest.tasks] == [*before, entry.name]
    assert entry.source_sha256 == models.digests[entry.name]
    context = f"{BUNDLE} v{manifest.version}"
    out = scratch / f"refold-{uuid.uuid4().hex[:8]}"
    with (
        CheckpointReader.open(models.base) as base,
        CheckpointReader.open(models.tasks[entry.name]) as checkpoint,
        (
            contextlib.nullcontext()
            if parent is None
            else CheckpointReader.from_files(
                [ws.cache.fetch(r, context=context) for r in parent.superposition]
            )
        ) as parent_reader,
    ):
        result = core_fold(
            base=base,
            checkpoint=checkpoint,
            parent=parent_reader,
            seed=entry.seed,
            config=manifest.transform,
            out_dir=out,
        )
    assert [s.sha256 for s in result.superposition] == [r.sha256 for r in manifest.superposition]
    assert [s.sha256 for s in result.private] == [r.sha256 for r in entry.private]
    shutil.rmtree(out)


def _check_materialized(ws: Workspace, version: int, task: str, models: Models, dest: Path) -> None:
    path = ws.materialize(BUNDLE, str(version), task, dest) / "model.safetensors"
    got, want = load_file(str(path)), load_file(str(models.tasks[task] / "model.safetensors"))
    assert got.keys() == want.keys()
    private_rank1 = ws.bundle_config(BUNDLE).rank1 == "private"  # else superposed
    for name, tensor in want.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        rank1 = tensor.dim() <= 1 and private_rank1
        if rank1 or not tensor.is_floating_point() or name.startswith("classifier."):
            assert torch.equal(got[name], tensor), name  # private or equal to the base
        else:
            assert bool(torch.isfinite(got[name]).all()), name


def _check_visible(ws: Workspace, models: Models, scratch: Path, recomputed: set[str]) -> list[int]:
    """Every visible version: its manifest loads, it is one whole fold on its parent,
    every task materializes and `pull` verifies every object. Returns the versions."""
    records = ws.registry.list_versions(BUNDLE)
    numbers = [r.version for r in records]
    assert numbers == list(range(1, len(numbers) + 1))
    manifests: dict[int, BundleManifest] = {}
    for record in records:
        manifest = ws.manifest(record)
        assert (manifest.version, manifest.parent_version) == (
            record.version,
            record.parent_version,
        )
        manifests[record.version] = manifest
        if record.manifest_sha256 not in recomputed:
            parent = manifests[record.parent_version] if record.parent_version else None
            _check_fold_step(ws, manifest, parent, models, scratch)
            recomputed.add(record.manifest_sha256)
        for entry in manifest.tasks:
            dest = scratch / f"m-{record.version}-{entry.name}-{uuid.uuid4().hex[:6]}"
            _check_materialized(ws, record.version, entry.name, models, dest)
            shutil.rmtree(dest)
        pulled = ws.pull(BUNDLE, str(record.version), scratch / f"pull-{uuid.uuid4().hex[:8]}")
        assert pulled.version == record.version
    registry_tasks = {t.name for t in ws.registry.tasks(BUNDLE)}
    assert registry_tasks == {t.name for t in manifests[numbers[-1]].tasks}
    return numbers


@dataclass
class KillReport:
    label: str
    exitcode: int | None
    committed: bool
    orphans: int
    stale_work_dirs: int
    store_tmp_files: int
    cache_tmp_files: int

    def __str__(self) -> str:
        state = "committed" if self.committed else "not committed"
        return (
            f"{self.label:>14}: exit {self.exitcode}, {state}, {self.orphans} orphan object(s), "
            f"{self.stale_work_dirs} stale work dir(s), {self.store_tmp_files} store / "
            f"{self.cache_tmp_files} cache tmp file(s)"
        )


def _kill_and_recover(
    *,
    label: str,
    settings: Settings,
    env: dict[str, str],
    models: Models,
    task: str,
    head_before: int,
    scratch: Path,
    delay: float | None = None,
    kill_point: str | None = None,
    recomputed: set[str],
) -> KillReport:
    scratch.mkdir(parents=True, exist_ok=True)
    log = scratch / "child.log"
    proc = _start_fold(env, models.tasks[task], task, log, kill_point)
    if delay is not None:
        proc.join(delay)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
    proc.join(120)
    assert not proc.is_alive(), "fold did not finish"
    output = log.read_text(errors="replace")
    assert proc.exitcode in (0, -signal.SIGKILL), output
    source = str(models.tasks[task])

    with Workspace(settings) as ws:
        stale = [p for p in ws.work_root.glob("*") if p.is_dir()]
        cache_tmp = len(list(ws.cache.root.glob(".tmp-*")))
        # 1. Nothing partial is visible: the old head, or the whole new version.
        versions = _check_visible(ws, models, scratch, recomputed)
        assert versions[-1] in (head_before, head_before + 1), versions
        committed = versions[-1] == head_before + 1
        ledger = ws.registry.ledger_lookup(BUNDLE, models.digests[task])
        if committed:
            assert ws.resolve(BUNDLE)[1].tasks[-1].name == task
            assert ledger == (task, head_before + 1)
        else:
            assert ledger is None
            assert proc.exitcode == -signal.SIGKILL, output

        # 2. Whatever the dead run stored is leased, so a gc now takes none of it.
        referenced = ws.registry.referenced_keys()
        orphans = _stored_keys(ws) - referenced
        assert orphans <= ws.registry.leased_keys(), "an orphan was stored without a lease"
        assert ws.gc(grace_s=0).deleted == []

        # 3. The retry completes, or finds the killed run's version.
        outcome = ws.fold(BUNDLE, source, task)
        assert (outcome.task, outcome.version) == (task, head_before + 1)
        assert outcome.skipped == committed
        assert ws.registry.head(BUNDLE).version == head_before + 1  # type: ignore[union-attr]

        # 4. Once the dead run's leases expire, gc leaves exactly what versions reference.
        _expire_leases(settings.resolved_database_url)
        report = ws.gc(grace_s=0)
        assert set(report.deleted) >= orphans - ws.registry.referenced_keys()
        assert _stored_keys(ws) == ws.registry.referenced_keys()
        assert not ws.work_root.exists() or not any(ws.work_root.iterdir()), sorted(
            p.name for p in ws.work_root.iterdir()
        )
        store_tmp = _local_tmp_files(ws)

    # 5. Every version is still complete, read from the store through an empty cache.
    fresh = settings.model_copy(update={"cache_dir": scratch / "fresh-cache"})
    with Workspace(fresh) as ws:
        _check_visible(ws, models, scratch, recomputed)
    return KillReport(
        label, proc.exitcode, committed, len(orphans), len(stale), store_tmp, cache_tmp
    )


def _local_tmp_files(ws: Workspace) -> int:
    root = getattr(ws.store, "root", None)
    if root is None:
        return 0
    return sum(1 for p in Path(root).rglob(".tmp-*"))


# ------------------------------------------------------- SIGKILL, local default
def version_1_home(root: Path, models: Models) -> Path:
    """A RANDES_HOME (SQLite + local store) under ``root`` holding version 1 with task t0:
    the template that SIGKILL tests copy, one copy a run."""
    home = root / "home"
    with Workspace(_settings(home)) as ws:
        _setup(ws, models, "t0")
    return home


@pytest.fixture(scope="module")
def local_template(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return version_1_home(tmp_path_factory.mktemp("template"), models)


@pytest.fixture(scope="module")
def local_fold_seconds(
    models: Models, local_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> float:
    """How long an uninterrupted `randes fold` of t1 onto version 1 takes here (best of 2)."""
    _warm_forkserver()
    times = []
    for attempt in range(2):
        home = tmp_path_factory.mktemp("measure") / "home"
        shutil.copytree(local_template, home)
        log = home.parent / "child.log"
        started = time.monotonic()
        proc = _start_fold({"RANDES_HOME": str(home)}, models.tasks["t1"], "t1", log)
        proc.join(120)
        times.append(time.monotonic() - started)
        assert proc.exitcode == 0, log.read_text(errors="replace")
        assert "version 2 adds task 't1'" in log.read_text(), attempt
    return min(times)


_RECOMPUTED: set[str] = set()  # manifests (by sha256) already recomputed byte for byte


@pytest.mark.parametrize("point", [f"{int(f * 100)}%" for f in KILL_FRACTIONS] + list(KILL_POINTS))
def test_sigkill_leaves_no_partial_version_local(
    point: str,
    models: Models,
    local_template: Path,
    local_fold_seconds: float,
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(local_template, home)
    delay = kill_point = None
    if point.endswith("%"):
        delay = local_fold_seconds * int(point[:-1]) / 100
    else:
        kill_point = point
    report = _kill_and_recover(
        label=point if delay is None else f"{point} ({delay:.2f}s)",
        settings=_settings(home),
        env={"RANDES_HOME": str(home)},
        models=models,
        task="t1",
        head_before=1,
        scratch=tmp_path / "scratch",
        delay=delay,
        kill_point=kill_point,
        recomputed=_RECOMPUTED,
    )
    print(f"\nfold {local_fold_seconds:.2f}s uninterrupted; {report}")
    if kill_point == "after-commit":
        assert report.committed and report.stale_work_dirs == 1
    elif kill_point is not None:
        assert not report.committed and report.orphans > 0


# ------------------------------------------------------ SIGKILL, S3 + PostgreSQL
def _s3_settings(
    home: Path, server: Any, bucket: str, database_url: str, retry_s: float
) -> Settings:
    return _settings(
        home,
        database_url=database_url,
        store_url=f"s3://{bucket}/randes",
        s3_endpoint_url=server.endpoint_url,
        s3_retry_seconds=retry_s,
    )


def _s3_version_1(
    models: Models, server: Any, database_url: str, tmp_path: Path, bucket: str, retry_s: float
) -> Settings:
    """Settings of a fresh bucket of ``server`` (started if a test stopped it) and
    ``database_url``, holding bundle b version 1 (task t0)."""
    if not server.running:
        server.start()
    settings = _s3_settings(
        tmp_path / "home", server, server.new_bucket(bucket), database_url, retry_s
    )
    with Workspace(settings) as ws:
        _setup(ws, models, "t0")
    return settings


def _child_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    env["RANDES_HOME"] = str(settings.home)
    env["RANDES_DATABASE_URL"] = settings.resolved_database_url
    env["RANDES_STORE_URL"] = settings.resolved_store_url
    if settings.s3_endpoint_url:
        env["RANDES_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.s3_retry_seconds:
        env["RANDES_S3_RETRY_SECONDS"] = str(settings.s3_retry_seconds)
    return env


def test_sigkill_leaves_no_partial_version_s3_postgres(
    models: Models, s3_server: Any, postgres_url: str, tmp_path: Path
) -> None:
    settings = _s3_version_1(models, s3_server, postgres_url, tmp_path, "kill", retry_s=10)
    env = _child_env(settings)

    # One uninterrupted run measures the fold (t1 -> version 2) ...
    log = tmp_path / "measure.log"
    _warm_forkserver()
    started = time.monotonic()
    proc = _start_fold(env, models.tasks["t1"], "t1", log)
    proc.join(120)
    seconds = time.monotonic() - started
    assert proc.exitcode == 0, log.read_text(errors="replace")

    # ... then t2 is killed halfway through its own.
    report = _kill_and_recover(
        label=f"50% ({seconds / 2:.2f}s)",
        settings=settings,
        env=env,
        models=models,
        task="t2",
        head_before=2,
        scratch=tmp_path / "scratch",
        delay=seconds / 2,
        recomputed=set(),
    )
    print(f"\nS3 + PostgreSQL: fold {seconds:.2f}s uninterrupted; {report}")


# ------------------------------------------------------------ S3 outage mid-fold
def _randes() -> str:
    return str(Path(sys.executable).parent / "randes")


def _wait_for_lease(proc: subprocess.Popen[bytes], database_url: str, timeout: float) -> bool:
    """Poll the lease table until the fold leases its keys (it then starts uploading)."""
    engine = make_engine(database_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            with engine.connect() as conn:
                count = conn.execute(select(func.count()).select_from(ObjectLease)).scalar_one()
            if count:
                return True
            time.sleep(0.005)
        return False
    finally:
        engine.dispose()


def test_s3_stopped_mid_fold_errors_cleanly_and_the_retry_completes(
    models: Models, s3_server: Any, postgres_url: str, tmp_path: Path
) -> None:
    settings = _s3_version_1(models, s3_server, postgres_url, tmp_path, "outage", retry_s=1.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANDES_")} | _child_env(
        settings
    )
    argv = [_randes(), "fold", BUNDLE, str(models.tasks["t1"]), "--task", "t1"]

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Freeze the fold the moment it leases its keys (next: uploads), take the server
        # down, and let the fold run on into the outage.
        assert _wait_for_lease(proc, postgres_url, timeout=180), proc.communicate()
        os.kill(proc.pid, signal.SIGSTOP)
        s3_server.stop()
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not s3_server.running:
            s3_server.start()

    text = stderr.decode()
    assert proc.returncode != 0, (stdout, text)
    lines = text.splitlines()
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ") and s3_server.endpoint_url in lines[0], text
    for secret in (s3_server.access_key, s3_server.secret_key):
        assert secret not in text and secret not in stdout.decode()

    with Workspace(settings) as ws:
        assert ws.registry.head(BUNDLE).version == 1  # type: ignore[union-attr]
        assert ws.registry.leased_keys() == set()  # the failed fold released its leases
        orphans = _stored_keys(ws) - ws.registry.referenced_keys()

    # The server is back: the same command completes.
    done = subprocess.run(argv, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert "version 2 adds task 't1'" in done.stdout.decode()

    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with Workspace(fresh) as ws:
        assert ws.registry.head(BUNDLE).version == 2  # type: ignore[union-attr]
        _check_visible(ws, models, tmp_path / "scratch", set())
        # What the failed attempt left behind is unleased: gc reclaims it at once.
        ws.gc(grace_s=0)
        assert _stored_keys(ws) == ws.registry.referenced_keys()
    print(f"\nS3 outage: {len(orphans)} object(s) left by the failed attempt; error: {lines[0]}")


# ------------------------------------------------------- gc racing a retried fold
@pytest.mark.parametrize("fold_leases", ["before-gc-rechecks", "after-gc-rechecks"])
def test_gc_running_during_a_retried_fold_keeps_what_the_fold_reuses(
    fold_leases: str, models: Models, local_template: Path, tmp_path: Path
) -> None:
    """A fold died before its commit, long ago: its objects are orphans, unleased. Its
    retry finds some of them stored (the task's private shard, its config.json: same
    bytes, same keys) and does not upload them again, while a gc deletes orphans.

    Both interleavings of the gc's final check with the retry's lease must end with a
    complete version: the gc sees the lease and keeps the objects, or the retry sees
    the gc's announcement, waits for it, and stores again what the gc deleted.
    """
    home = tmp_path / "home"
    shutil.copytree(local_template, home)
    settings = _settings(home)
    env = {"RANDES_HOME": str(home)}
    proc = _start_fold(env, models.tasks["t1"], "t1", tmp_path / "dead.log", "before-commit")
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    _expire_leases(settings.resolved_database_url)

    gc_ws, fold_ws = Workspace(settings), Workspace(settings)
    gc_paused, resume_gc, fold_stored = threading.Event(), threading.Event(), threading.Event()
    gc_errors: list[BaseException] = []

    def run_gc() -> None:
        try:
            gc_ws.gc(grace_s=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            gc_errors.append(exc)

    if fold_leases == "before-gc-rechecks":
        # gc has read references and leases and listed the store; the retry then
        # leases and stores, and only then does the gc decide what to delete.
        listing = gc_ws.store.list

        def list_then_pause(prefix: str = "") -> Iterator[Any]:
            items = list(listing(prefix))
            gc_paused.set()
            assert resume_gc.wait(60)
            yield from items

        gc_ws.store.list = list_then_pause  # type: ignore[method-assign]
    else:
        # gc has announced and re-checked, and is about to delete; the retry leases now.
        delete = gc_ws.store.delete

        def pause_then_delete(key: str) -> None:
            gc_paused.set()
            assert resume_gc.wait(60)
            delete(key)

        gc_ws.store.delete = pause_then_delete  # type: ignore[method-assign]

    commit = fold_ws.registry.commit_version

    def note_then_commit(*args: Any, **kw: Any) -> Any:
        fold_stored.set()  # leased, and stored (or found stored) every object
        return commit(*args, **kw)

    fold_ws.registry.commit_version = note_then_commit  # type: ignore[method-assign]
    retry: dict[str, Any] = {}
    fold_thread = threading.Thread(
        target=lambda: retry.update(outcome=fold_ws.fold(BUNDLE, str(models.tasks["t1"]), "t1"))
    )
    gc_thread = threading.Thread(target=run_gc)
    try:
        gc_thread.start()
        assert gc_paused.wait(60)
        fold_thread.start()
        if fold_leases == "before-gc-rechecks":
            assert fold_stored.wait(60)
        else:
            # The retry has leased, sees the announcement and waits for the gc.
            announced = [k for k in fold_ws.registry.leased_keys() if k.startswith("gc-")]
            assert announced, "the gc announced nothing"
            time.sleep(1.0)
            assert not fold_stored.is_set(), "the retry stored objects a gc is deleting"
        resume_gc.set()
        gc_thread.join(60)
        fold_thread.join(60)
    finally:
        resume_gc.set()
        gc_thread.join(60)
        fold_thread.join(60)
        gc_ws.close()
        fold_ws.close()
    assert not gc_errors, gc_errors
    assert retry["outcome"].version == 2

    with Workspace(settings) as ws:
        missing = sorted(k for k in ws.registry.referenced_keys() if not ws.store.exists(k))
        assert missing == [], f"version 2 references deleted objects: {missing}"
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with Workspace(fresh) as ws:
        _check_visible(ws, models, tmp_path / "scratch", set())
