"""Concurrent writers on the registry: separate OS processes (spawn) racing on real
SQLite and real PostgreSQL. No fold may be lost or applied twice."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session

from storage.registry import (
    AlreadyIngestedError,
    NewTask,
    Registry,
    VersionConflictError,
)
from storage.registry.engine import make_engine, write_options
from storage.registry.models import BundleVersion, IngestionLedger
from tests.storage.registries import upgraded_registry

BUNDLE = "b"
TIMEOUT_S = 120


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


@pytest.fixture
def registry(registry_url: str) -> Iterator[Registry]:
    with upgraded_registry(registry_url) as reg:
        reg.add_base("base", "file:///base", sha("base"), "bases/base.json", sha("bm"), [])
        reg.create_bundle(BUNDLE, "base", {"maps": ["sign"]})
        yield reg


def _commit(reg: Registry, version: int, name: str, seed: int, source: str) -> None:
    reg.commit_version(
        BUNDLE,
        version=version,
        parent_version=version - 1 if version > 1 else None,
        manifest_key=f"manifests/{version}-{name}.json",
        manifest_sha256=sha(f"manifest {version} {name}"),
        object_keys=[f"shards/{name}"],
        added=[NewTask(name, seed, f"file:///{name}", source)],
        ledger=[(source, name)],
    )


# -- workers (module level: spawn imports this module in each child) ----------------------


def _race_worker(
    url: str, barrier: Any, results: Any, idx: int, name: str, seed: int, source: str
) -> None:
    """Commit version 1 at the same instant as the other workers; report the outcome."""
    reg = Registry(url)
    try:
        reg.head(BUNDLE)  # connect before the start line, so the race is on the commit
        barrier.wait(timeout=TIMEOUT_S)
        try:
            _commit(reg, 1, name, seed, source)
            results.put((idx, "won", None))
        except VersionConflictError:
            results.put((idx, "version-conflict", None))
        except AlreadyIngestedError as exc:
            results.put((idx, "already-ingested", (exc.task_name, exc.version)))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put((idx, "error", repr(exc)))
    finally:
        reg.close()


def _fold_worker(
    url: str, barrier: Any, results: Any, idx: int, sources: list[tuple[str, int, str]]
) -> None:
    """The optimistic fold loop of DESIGN.md: read head, commit head + 1, retry on conflict."""
    reg = Registry(url)
    outcomes: list[tuple[str, str, int]] = []
    retries = 0
    try:
        reg.head(BUNDLE)
        barrier.wait(timeout=TIMEOUT_S)
        for name, seed, source in sources:
            while True:
                hit = reg.ledger_lookup(BUNDLE, source)
                if hit is not None:
                    outcomes.append(("noop", hit[0], hit[1]))
                    break
                head = reg.head(BUNDLE)
                version = 1 if head is None else head.version + 1
                try:
                    _commit(reg, version, name, seed, source)
                except VersionConflictError:
                    retries += 1
                    continue
                except AlreadyIngestedError as exc:
                    assert exc.task_name is not None and exc.version is not None
                    outcomes.append(("noop", exc.task_name, exc.version))
                    break
                outcomes.append(("committed", name, version))
                break
        results.put((idx, outcomes, retries))
    except Exception as exc:
        results.put((idx, "error", repr(exc)))
    finally:
        reg.close()


def _upgrade_worker(url: str, barrier: Any, results: Any, idx: int) -> None:
    """`randes init` from several workers at once."""
    reg = Registry(url)
    try:
        barrier.wait(timeout=TIMEOUT_S)
        reg.upgrade()
        results.put((idx, "upgraded", reg.schema_revision()))
    except Exception as exc:
        results.put((idx, "error", repr(exc)))
    finally:
        reg.close()


def _run_processes(target: Callable[..., None], url: str, args: list[tuple[Any, ...]]) -> list[Any]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    results = ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(url, barrier, results, i, *a), daemon=True)
        for i, a in enumerate(args)
    ]
    for p in procs:
        p.start()
    out = []
    try:
        for _ in procs:
            out.append(results.get(timeout=TIMEOUT_S))
    except queue.Empty:
        pytest.fail(f"only {len(out)} of {len(procs)} workers reported: {out}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    errors = [r for r in out if r[1] == "error"]
    assert not errors, errors
    return sorted(out)


# -- races ---------------------------------------------------------------------------------


def test_racing_commits_exactly_one_wins(registry: Registry, registry_url: str) -> None:
    n = 4
    out = _run_processes(
        _race_worker, registry_url, [(f"t{i}", 100 + i, sha(f"src {i}")) for i in range(n)]
    )
    assert Counter(r[1] for r in out) == {"won": 1, "version-conflict": n - 1}
    winner = next(r[0] for r in out if r[1] == "won")
    assert [v.version for v in registry.list_versions(BUNDLE)] == [1]
    assert [t.name for t in registry.tasks(BUNDLE)] == [f"t{winner}"]
    assert registry.used_seeds(BUNDLE) == {100 + winner}
    for i in range(n):
        expected = (f"t{i}", 1) if i == winner else None
        assert registry.ledger_lookup(BUNDLE, sha(f"src {i}")) == expected


def test_racing_same_checkpoint_is_ingested_once(registry: Registry, registry_url: str) -> None:
    n = 3
    out = _run_processes(
        _race_worker, registry_url, [(f"t{i}", 100 + i, sha("the same")) for i in range(n)]
    )
    assert Counter(r[1] for r in out) == {"won": 1, "already-ingested": n - 1}
    winner = next(r[0] for r in out if r[1] == "won")
    assert all(r[2] == (f"t{winner}", 1) for r in out if r[1] == "already-ingested")
    assert [t.name for t in registry.tasks(BUNDLE)] == [f"t{winner}"]


def test_optimistic_fold_loop_loses_nothing_and_applies_nothing_twice(
    registry: Registry, registry_url: str
) -> None:
    workers, per_worker = 3, 3
    shared = ("shared", 999, sha("shared checkpoint"))  # every worker also folds this one
    plans = [
        ([(f"w{w}-{i}", w * 100 + i, sha(f"ckpt {w} {i}")) for i in range(per_worker)] + [shared],)
        for w in range(workers)
    ]
    out = _run_processes(_fold_worker, registry_url, plans)

    committed = [o for _w, outcomes, _r in out for o in outcomes if o[0] == "committed"]
    noops = [o for _w, outcomes, _r in out for o in outcomes if o[0] == "noop"]
    total = workers * per_worker + 1
    assert len(committed) == total and len(noops) == workers - 1
    assert sorted(v for _kind, _name, v in committed) == list(range(1, total + 1))
    shared_version = next(v for _k, name, v in committed if name == "shared")
    assert all((name, v) == ("shared", shared_version) for _k, name, v in noops)

    versions = registry.list_versions(BUNDLE)
    assert [v.version for v in versions] == list(range(1, total + 1))
    tasks = registry.tasks(BUNDLE)
    assert len(tasks) == total
    assert sorted(t.added_in_version for t in tasks) == list(range(1, total + 1))
    assert {t.name for t in tasks} == {name for _k, name, _v in committed}
    for w in range(workers):
        for i in range(per_worker):
            hit = registry.ledger_lookup(BUNDLE, sha(f"ckpt {w} {i}"))
            assert hit is not None and hit[0] == f"w{w}-{i}"


def test_concurrent_upgrades_all_succeed(registry_url: str) -> None:
    out = _run_processes(_upgrade_worker, registry_url, [(), (), ()])
    assert [r[1:] for r in out] == [("upgraded", "0004")] * 3
    reg = Registry(registry_url)
    try:
        reg.add_base("base", "file:///base", sha("base"), "bases/base.json", sha("bm"), [])
        assert len(reg.list_bases()) == 1
    finally:
        reg.close()


# -- a writer blocked behind an uncommitted competitor -------------------------------------
#
# Deterministic version of the races above: the competitor holds its insert open while
# the registry's commit runs. On PostgreSQL the commit passes its checks (the row is not
# visible yet), blocks on the unique index and must turn the violation into the specific
# error; on SQLite it waits for the write lock, then sees the row in its checks.


def _blocked_commit(
    registry: Registry, registry_url: str, competitor_rows: Callable[[int], list[Any]]
) -> BaseException | None:
    engine = make_engine(registry_url).execution_options(**write_options())
    bundle_id = registry.get_bundle(BUNDLE).id
    outcome: list[BaseException | None] = []

    def commit() -> None:
        try:
            _commit(registry, 1, "mine", 1, sha("source X"))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        with Session(engine) as competitor:
            competitor.add_all(competitor_rows(bundle_id))
            competitor.flush()  # inserted and locked, not committed
            thread = threading.Thread(target=commit, daemon=True)
            thread.start()
            time.sleep(0.5)
            assert thread.is_alive(), f"commit did not wait for the competitor: {outcome}"
            competitor.commit()
        thread.join(timeout=TIMEOUT_S)
        assert not thread.is_alive()
    finally:
        engine.dispose()
    return outcome[0]


def _version_row(bundle_id: int) -> BundleVersion:
    return BundleVersion(
        bundle_id=bundle_id,
        version=1,
        parent_version=None,
        status="staged",
        manifest_key="manifests/theirs.json",
        manifest_sha256=sha("theirs"),
    )


def test_blocked_writer_gets_version_conflict(registry: Registry, registry_url: str) -> None:
    error = _blocked_commit(registry, registry_url, lambda b: [_version_row(b)])
    assert isinstance(error, VersionConflictError), error
    assert [v.manifest_key for v in registry.list_versions(BUNDLE)] == ["manifests/theirs.json"]
    assert registry.ledger_lookup(BUNDLE, sha("source X")) is None
    assert registry.tasks(BUNDLE) == []


def test_blocked_writer_gets_already_ingested(registry: Registry, registry_url: str) -> None:
    def rows(bundle_id: int) -> list[Any]:
        ledger = IngestionLedger(
            bundle_id=bundle_id, source_sha256=sha("source X"), task_name="theirs", version=1
        )
        return [ledger, _version_row(bundle_id)]

    error = _blocked_commit(registry, registry_url, rows)
    assert isinstance(error, AlreadyIngestedError), error
    assert (error.task_name, error.version) == ("theirs", 1)
