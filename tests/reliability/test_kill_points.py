"""SIGKILL at 28 points of `randes fold`, `randes base add` and `randes gc`, on the
embedded default (local store + SQLite): nothing is ever lost or half visible.

The fold of task t1 onto version 1 is killed

- at 12 moments drawn from a seeded random generator over its measured duration
  (`random.Random(KILL_SEED)`, fractions 2%..98% of an uninterrupted run), and
- at 12 exact points of the commit protocol: as it starts computing, halfway through
  computing, halfway through a download into the cache, right after leasing its keys,
  between writing a store object's temp file and linking it, after its first upload,
  before uploading the manifest, after leasing the manifest, before the registry
  commit, inside the registry transaction (rows half inserted), right after the
  commit, and after releasing its leases.

After each kill (`recover_and_check`): the head is the old version or the whole new
one; every visible version recomputes byte for byte, materializes every task and pulls
with every sha256 verified; every orphan object is leased so a `gc` then deletes none;
the retry completes (or reports skipped when the killed run had committed); once the
leases expire, `gc(grace_s=0)` deletes exactly the orphans the retry did not reuse and
leaves no temp file in the store or the cache and no work directory.

`randes base add` is killed at 3 points (after its lease, after its first upload,
before registering), and `randes gc` after its first deletion. Two more tests pin the
pieces these rely on: `gc` sweeps only temp files whose writer is dead, and
`add_base` leases what it uploads before uploading it.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from storage.registry import BaseNotFoundError
from storage.settings import Settings
from storage.store.base import lock_while_writing
from storage.workspace import Workspace
from tests.reliability.conftest import (
    BASE,
    BUNDLE,
    CONFIG,
    STAMPS_ENV,
    Models,
    Recovery,
    Trials,
    check_visible,
    child_env,
    expire_leases,
    make_settings,
    recover_and_check,
    run_cli,
    start_cli,
    stored_keys,
    tmp_files,
    version_1_home,
    warm_forkserver,
)

pytestmark = pytest.mark.usefixtures("no_randes_env")

KILL_SEED = 20250611
N_RANDOM = 12
_rng = random.Random(KILL_SEED)
RANDOM_FRACTIONS = sorted(round(_rng.uniform(0.02, 0.98), 3) for _ in range(N_RANDOM))

# point -> whether the killed run had committed (None: depends on timing)
PROTOCOL_POINTS = {
    "compute-start": False,
    "mid-compute": False,
    "mid-cache-copy": False,
    "after-lease": False,
    "mid-store-write": False,
    "after-first-upload": False,
    "before-manifest": False,
    "after-manifest-lease": False,
    "before-commit": False,
    "mid-commit": False,
    "after-commit": True,
    "after-release": True,
}
BASE_POINTS = ("after-lease", "after-first-upload", "before-add-base")


@pytest.fixture(scope="module")
def template(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return version_1_home(tmp_path_factory.mktemp("kill-template"), models)


STAMPS = "stamp@compute-start,stamp@after-lease,stamp@before-commit,stamp@after-release"
PHASES = {  # the last point a run stamped -> the phase it was in when killed
    "": "start-up (source hashing, registry reads)",
    "fold": "computing the superposition",
    "Registry.lease": "uploading",
    "Registry.commit_version": "committing / committed",
    "Registry.release": "committed, exiting",
}


def _stamps(path: Path) -> list[tuple[str, float]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [(name, float(t)) for name, t in (line.split() for line in lines)]


@pytest.fixture(scope="module")
def fold_seconds(models: Models, template: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    """How long an uninterrupted `randes fold` of t1 onto version 1 takes from its start
    to the release of its leases (median of 3 runs after a warm-up run)."""
    warm_forkserver()
    times = []
    for attempt in range(4):
        home = tmp_path_factory.mktemp("kill-measure") / "home"
        shutil.copytree(template, home)
        stamps = home.parent / "stamps"
        env = child_env(make_settings(home)) | {STAMPS_ENV: str(stamps)}
        child = start_cli(
            env, ["fold", BUNDLE, str(models.tasks["t1"]), "--task", "t1"], home.parent, STAMPS
        )
        assert child.join(120) == 0, child.output()
        assert "version 2 adds task 't1'" in child.stdout
        marks = dict(_stamps(stamps))
        if attempt:
            times.append(marks["Registry.release"] - child.started)
    return sorted(times)[1]


_RECOMPUTED: set[str] = set()  # manifests (by sha256) already recomputed byte for byte


def _recover_t1(settings: Settings, models: Models, tmp_path: Path, **options: Any) -> Recovery:
    """``recover_and_check`` after a fold of task t1 on top of version 1 was interrupted."""
    return recover_and_check(
        settings=settings,
        models=models,
        task="t1",
        head_before=1,
        scratch=tmp_path / "scratch",
        recomputed=_RECOMPUTED,
        **options,
    )


def _fold_killed(
    home: Path, models: Models, tmp_path: Path, *, point: str = "", delay: float | None = None
) -> tuple[int | None, str]:
    """Run the fold of t1, killed at ``point`` or after ``delay`` seconds. Returns its
    exit code and the phase it had reached (`PHASES`)."""
    stamps = tmp_path / "stamps"
    child = start_cli(
        child_env(make_settings(home)) | {STAMPS_ENV: str(stamps)},
        ["fold", BUNDLE, str(models.tasks["t1"]), "--task", "t1"],
        tmp_path / "logs",
        ",".join(filter(None, [point, STAMPS])),
    )
    if delay is not None:
        child.proc.join(max(0.0, delay - (time.monotonic() - child.started)))
        if child.proc.is_alive():
            os.kill(child.pid, signal.SIGKILL)
    code = child.join(120)
    assert code in (0, -signal.SIGKILL), child.output()
    if code == 0:
        assert child.stderr == "", child.output()
    marks = _stamps(stamps)
    phase = "finished" if code == 0 else PHASES[marks[-1][0] if marks else ""]
    return code, phase


@pytest.mark.parametrize("fraction", RANDOM_FRACTIONS, ids=[f"t={f:.3f}" for f in RANDOM_FRACTIONS])
def test_fold_killed_at_a_random_moment(
    fraction: float,
    models: Models,
    template: Path,
    fold_seconds: float,
    tmp_path: Path,
    trials: Trials,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    delay = fold_seconds * fraction
    code, phase = _fold_killed(home, models, tmp_path, delay=delay)
    result = _recover_t1(make_settings(home), models, tmp_path)
    print(f"\nkill at {delay:.3f}s of {fold_seconds:.3f}s ({phase}): exit {code}, {result}")
    trials.record("SIGKILL: fold, random moment (local + SQLite)", phase)


@pytest.mark.parametrize("point", list(PROTOCOL_POINTS))
def test_fold_killed_at_a_protocol_point(
    point: str, models: Models, template: Path, tmp_path: Path, trials: Trials
) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    if point == "mid-cache-copy":
        shutil.rmtree(home / "cache")  # the fold must download the base into the cache
    code, _ = _fold_killed(home, models, tmp_path, point=f"die@{point}")
    assert code == -signal.SIGKILL, f"{point} was never reached"
    if point in ("mid-store-write", "mid-cache-copy"):
        root = home / ("store" if point == "mid-store-write" else "cache")
        assert tmp_files(root), f"{point}: expected a temp file left by the dead writer"
    result = _recover_t1(make_settings(home), models, tmp_path)
    print(f"\n{point}: {result}")
    assert result.committed == PROTOCOL_POINTS[point]
    if point in ("after-first-upload", "before-manifest", "before-commit", "mid-commit"):
        assert result.orphans > 0
    if point in ("mid-store-write", "mid-cache-copy"):
        assert result.swept >= 1
    trials.record("SIGKILL: fold, protocol point (local + SQLite)", point)


# --------------------------------------------------------------- base add
@pytest.mark.parametrize("point", BASE_POINTS)
def test_base_add_killed(point: str, models: Models, tmp_path: Path, trials: Trials) -> None:
    home = tmp_path / "home"
    settings = make_settings(home)
    with Workspace(settings) as ws:
        ws.init()
    child = run_cli(
        child_env(settings),
        ["base", "add", BASE, str(models.base)],
        tmp_path / "logs",
        f"die@{point}",
    )
    assert child.proc.exitcode == -signal.SIGKILL, child.output()
    with Workspace(settings) as ws:
        with pytest.raises(BaseNotFoundError):
            ws.registry.get_base(BASE)
        orphans = stored_keys(ws)
        if point != "after-lease":
            assert orphans, "the killed run stored nothing"
        assert orphans <= ws.registry.leased_keys(), "base objects were stored without a lease"
        assert ws.gc(grace_s=0).deleted == []
        assert stored_keys(ws) == orphans

        ws.add_base(BASE, str(models.base))  # the retry
        expire_leases(settings.resolved_database_url)
        report = ws.gc(grace_s=0)
        assert set(report.deleted) == orphans - ws.registry.referenced_keys()
        assert stored_keys(ws) == ws.registry.referenced_keys()
        ws.create_bundle(BUNDLE, BASE, CONFIG)
        ws.fold(BUNDLE, str(models.tasks["t0"]), "t0")
        check_visible(ws, models, tmp_path / "scratch", set())
    trials.record("SIGKILL: base add (local + SQLite)", point)


# --------------------------------------------------------------------- gc
def test_gc_killed_mid_delete(
    models: Models, template: Path, tmp_path: Path, trials: Trials
) -> None:
    """A fold died before its commit long ago; a gc reclaiming its orphans is killed
    after its first deletion. Nothing visible is touched; the fold's retry and the next
    gc complete the picture."""
    home = tmp_path / "home"
    shutil.copytree(template, home)
    settings = make_settings(home)
    code, _ = _fold_killed(home, models, tmp_path, point="die@before-commit")
    assert code == -signal.SIGKILL
    expire_leases(settings.resolved_database_url)
    with Workspace(settings) as ws:
        orphans = stored_keys(ws) - ws.registry.referenced_keys()
    assert len(orphans) > 1
    child = run_cli(
        child_env(settings), ["gc", "--grace", "0"], tmp_path / "logs", "die@gc-after-delete"
    )
    assert child.proc.exitcode == -signal.SIGKILL, child.output()
    with Workspace(settings) as ws:
        left = stored_keys(ws) - ws.registry.referenced_keys()
        assert left < orphans and len(orphans - left) == 1  # exactly one deleted
        announced = {k for k in ws.registry.leased_keys() if k.startswith("gc-deleting:")}
        assert announced, "the dead gc's announcement should outlive it (until its TTL)"
    # The announcement lasts GC_INTENT_TTL_S; a retry touching those keys waits it out.
    expire_leases(settings.resolved_database_url)
    result = _recover_t1(settings, models, tmp_path, leased_orphans=False)
    print(f"\ngc killed after 1 of {len(orphans)} deletions: {result}")
    trials.record("SIGKILL: gc mid-delete (local + SQLite)", "after first delete")


# ------------------------------------------------------ the pieces relied on
def test_gc_sweeps_temp_files_of_dead_writers_only(
    models: Models, template: Path, tmp_path: Path, trials: Trials
) -> None:
    home = tmp_path / "home"
    shutil.copytree(template, home)
    settings = make_settings(home)
    old = time.time() - 7200
    paths = {}
    for root_name in ("store", "cache"):
        root = home / root_name / ("objects/ab" if root_name == "store" else "objects")
        root.mkdir(parents=True, exist_ok=True)
        for kind in ("stale", "young", "live"):
            path = root / f".tmp-{kind}00000000-{'a' * 64}"
            path.write_bytes(b"partial")
            if kind != "young":
                os.utime(path, (old, old))
            paths[root_name, kind] = path
    live = [os.open(paths[r, "live"], os.O_RDWR) for r in ("store", "cache")]
    try:
        for fd in live:
            lock_while_writing(fd)  # a writer still at work holds this lock
        with Workspace(settings) as ws:
            before = stored_keys(ws)
            report = ws.gc(grace_s=3600)
            assert report.swept == 2 and report.deleted == []
            assert stored_keys(ws) == before
        for (_root, kind), path in paths.items():
            assert path.exists() == (kind != "stale"), path
    finally:
        for fd in live:
            os.close(fd)
    with Workspace(settings) as ws:
        assert ws.gc(grace_s=3600).swept == 2  # the writer died: its old file goes
        assert ws.gc(grace_s=0).swept == 2  # and the young ones with no grace
    assert tmp_files(home / "store") == tmp_files(home / "cache") == []
    trials.record("temp-file sweep (local store + cache)", "stale/young/locked", tried=6)


def test_add_base_leases_before_it_uploads(models: Models, tmp_path: Path, trials: Trials) -> None:
    """A `gc` with no grace running between `add_base`'s uploads and its registry
    row must keep every object of the base (it is leased), as it does for folds."""
    settings = make_settings(tmp_path / "home")
    with Workspace(settings) as ws, Workspace(settings) as other:
        ws.init()
        add = ws.registry.add_base
        reports = []

        def gc_then_add(*args: object, **kwargs: object) -> object:
            reports.append(other.gc(grace_s=0))
            return add(*args, **kwargs)  # type: ignore[arg-type]

        ws.registry.add_base = gc_then_add  # type: ignore[method-assign]
        ws.add_base(BASE, str(models.base))
        assert reports and reports[0].deleted == []
        assert all(ws.store.exists(k) for k in ws.registry.referenced_keys())
        assert ws.registry.leased_keys() == set()  # released once registered
        ws.create_bundle(BUNDLE, BASE, CONFIG)
        ws.fold(BUNDLE, str(models.tasks["t0"]), "t0")
        check_visible(ws, models, tmp_path / "scratch", set())
    trials.record("race: gc during base add", "gc between uploads and registration")
