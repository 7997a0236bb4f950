"""Retention (`randes gc --keep-last K`) on real stores and registries.

- versions older than each bundle's K newest go, with the objects only they referenced;
  the head and every version an alias or a published status names stay, objects and all
  (pulled afterwards from the store itself and materialized);
- ``--dry-run`` lists the same versions and objects and changes nothing;
- a pull in progress keeps every object it copies (its lease), and a pull whose version
  retention took before its lease fails in one line, leaving no directory;
- a fold building on a parent that retention takes meanwhile rebuilds on the new head.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from randes.config import TransformConfig
from storage.gc import Retention, plan_retention, protected_versions
from storage.pulled import PulledVersion, pulled_shards
from storage.registry import InvalidValueError, VersionInUseError, VersionNotFoundError
from storage.workspace import Workspace
from tests.cli_run import cli
from tests.workspaces import BACKENDS, backend, make_models, open_workspace, workspace_on

TASKS = ("alpha", "beta", "gamma", "delta")


@pytest.fixture(params=BACKENDS)
def url_and_store(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return backend(request)


def _open(tmp_path: Path, name: str, url_and_store: tuple[str, Any]) -> Workspace:
    """A workspace of its own (home, cache) on the shared store and registry: another
    process as far as caches go."""
    url, store = url_and_store
    return workspace_on(tmp_path / name, url, store)


@pytest.fixture
def ws(tmp_path: Path, url_and_store: tuple[str, Any]) -> Iterator[Workspace]:
    with open_workspace(tmp_path / "home", *url_and_store) as workspace:
        yield workspace


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A BERT base and four fine-tunes saved by transformers: fp32, bf16 (over the fp32
    base), a token classifier without the base's pooler, fp32."""
    shapes = {"beta": {"dtype": "bfloat16"}, "gamma": {"task": "BertForTokenClassification"}}
    return make_models(tmp_path / "models", TASKS, shapes=shapes)


def _history(ws: Workspace, models: dict[str, Path]) -> None:
    """Versions 1..5: four folds and a removal; 1 published, 2 aliased production (which
    publishes it too)."""
    ws.add_base("tiny", str(models["base"]))
    ws.create_bundle("b", "tiny", TransformConfig())
    for task in TASKS:
        ws.fold("b", str(models[task]), task)
    ws.remove("b", "beta")
    for version in (1, 2):
        ws.registry.set_status("b", version, "validated")
    ws.registry.set_status("b", 1, "published")
    ws.registry.set_alias("b", "production", 2)


def _keys(ws: Workspace, version: int) -> set[str]:
    record, manifest = ws.resolve("b", str(version))
    return {record.manifest_key, *(ref.key for ref in manifest.shards())}


def _stored(ws: Workspace) -> set[str]:
    return {info.key for info in ws.store.list("")}


def test_keep_last_deletes_old_versions_and_keeps_protected_ones(
    ws: Workspace, models: dict[str, Path], tmp_path: Path
) -> None:
    _history(ws, models)
    keys = {v: _keys(ws, v) for v in range(1, 6)}
    only_old = (keys[3] | keys[4]) - keys[1] - keys[2] - keys[5]
    assert only_old, "versions 3 and 4 hold superpositions of their own"
    assert protected_versions(ws.registry, "b") == {
        1: "published",
        2: "alias production, published",  # an alias publishes what it names
        5: "head",
    }
    plan = plan_retention(ws.registry, "b", 1)
    assert (plan.deleted, plan.kept) == ([3, 4], [1, 2, 5])

    before = _stored(ws)
    dry = ws.gc(grace_s=0, dry_run=True, keep_last=1)
    assert [(r.bundle, r.deleted) for r in dry.retention] == [("b", [3, 4])]
    assert set(dry.deleted) == only_old
    assert [v.version for v in ws.registry.list_versions("b")] == [1, 2, 3, 4, 5]
    assert _stored(ws) == before

    report = ws.gc(grace_s=0, keep_last=1)
    assert report.retention == [
        Retention("b", [3, 4], [1, 2, 5], {1: "published", 2: "alias production, published"})
    ]
    assert set(report.deleted) == only_old
    assert [v.version for v in ws.registry.list_versions("b")] == [1, 2, 5]
    stored = _stored(ws)
    assert not only_old & stored
    assert keys[1] | keys[2] | keys[5] <= stored
    # History stays: the tasks still know the versions they entered and left.
    tasks = {t.name: t for t in ws.registry.tasks("b", include_removed=True)}
    assert (tasks["gamma"].added_in_version, tasks["beta"].removed_in_version) == (3, 5)

    # What retention kept is whole in the store: pulled from it, materialized offline.
    for version, task in ((1, "alpha"), (2, "beta"), (5, "delta")):
        dest = tmp_path / f"pulled-{version}"
        ws.pull("b", str(version), dest)
        out = PulledVersion(dest).materialize(task, tmp_path / f"model-{version}")
        assert load_file(str(out / "model.safetensors"))

    # Nothing left to take: a second run deletes nothing.
    again = ws.gc(grace_s=0, keep_last=1)
    assert (again.retention, again.deleted) == ([], [])
    # The next fold takes a new number, not a deleted one.
    assert ws.fold("b", str(models["beta"]), "beta").version == 6


def test_registry_refuses_to_delete_protected_versions(
    ws: Workspace, models: dict[str, Path]
) -> None:
    _history(ws, models)
    for version, why in ((1, "published"), (2, "published"), (5, "head")):
        with pytest.raises(VersionInUseError, match=why):
            ws.registry.delete_versions("b", [3, version])
    assert [v.version for v in ws.registry.list_versions("b")] == [1, 2, 3, 4, 5]
    with pytest.raises(InvalidValueError):
        ws.gc(keep_last=0)


def test_a_pull_in_progress_keeps_what_it_copies(
    ws: Workspace, models: dict[str, Path], tmp_path: Path, url_and_store: tuple[str, Any]
) -> None:
    _history(ws, models)
    keys = _keys(ws, 3) - _keys(ws, 1) - _keys(ws, 2) - _keys(ws, 5)
    record, manifest = ws.resolve("b", "3")
    copied = keys & {record.manifest_key, *(r.key for r in pulled_shards(manifest, master=False))}
    assert copied and keys - copied, "a default pull copies the serving copy, not the master"
    other = _open(tmp_path, "other", url_and_store)
    reports = []
    get_file = ws.store.get_file

    def gc_between_downloads(*args: Any, **kwargs: Any) -> Any:
        result = get_file(*args, **kwargs)
        if not reports:  # the first object is down: retention and gc run now
            reports.append(other.gc(grace_s=0, keep_last=1))
        return result

    try:
        ws.store.get_file = gc_between_downloads  # type: ignore[method-assign]
        ws.pull("b", "3", tmp_path / "pulled")
    finally:
        del ws.store.get_file
    [report] = reports
    assert [r.deleted for r in report.retention] == [[3, 4]]
    assert not copied & set(report.deleted), "gc took objects a pull had leased"
    assert keys - copied <= set(report.deleted), "what the pull does not copy goes"
    out = PulledVersion(tmp_path / "pulled").materialize("gamma", tmp_path / "model")
    assert (out / "model.safetensors").is_file()
    # Once the pull is done, its lease is gone and the next gc reclaims them.
    assert copied <= set(other.gc(grace_s=0).deleted)
    other.close()


def test_a_pull_whose_version_went_before_its_lease_fails_cleanly(
    ws: Workspace, models: dict[str, Path], tmp_path: Path, url_and_store: tuple[str, Any]
) -> None:
    _history(ws, models)
    other = _open(tmp_path, "other", url_and_store)
    lease = ws.registry.lease

    def gc_first(*args: Any, **kwargs: Any) -> Any:
        other.gc(grace_s=0, keep_last=1)
        return lease(*args, **kwargs)

    ws.registry.lease = gc_first  # type: ignore[method-assign]
    try:
        with pytest.raises(VersionNotFoundError):
            ws.pull("b", "3", tmp_path / "pulled")
    finally:
        del ws.registry.lease
        other.close()
    assert not (tmp_path / "pulled").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".pulled")]


def test_a_fold_whose_parent_retention_takes_rebuilds_on_the_new_head(
    ws: Workspace, models: dict[str, Path], tmp_path: Path, url_and_store: tuple[str, Any]
) -> None:
    ws.add_base("tiny", str(models["base"]))
    ws.create_bundle("b", "tiny", TransformConfig())
    ws.fold("b", str(models["alpha"]), "alpha")
    parent = _keys(ws, 1)
    folder = _open(tmp_path, "folder", url_and_store)  # its cache holds nothing yet
    used_seeds = folder.registry.used_seeds
    raced: list[int] = []

    def another_fold_and_gc_first(bundle: str) -> set[int]:
        if not raced:  # the fold has read head 1 and is about to read its master
            raced.append(ws.fold("b", str(models["beta"]), "beta").version)
            report = ws.gc(grace_s=0, keep_last=1)
            assert [r.deleted for r in report.retention] == [[1]]
            assert parent & set(report.deleted)
        return used_seeds(bundle)

    folder.registry.used_seeds = another_fold_and_gc_first  # type: ignore[method-assign]
    try:
        outcome = folder.fold("b", str(models["gamma"]), "gamma")
    finally:
        folder.close()
    assert raced == [2]
    assert (outcome.version, outcome.attempts) == (3, 2)
    _, manifest = ws.resolve("b")
    assert [t.name for t in manifest.tasks] == ["alpha", "beta", "gamma"]
    out = ws.materialize("b", None, "gamma", tmp_path / "gamma")
    assert (out / "model.safetensors").is_file()


def test_cli_keep_last(randes_home: Path, models: dict[str, Path]) -> None:
    """`randes gc --keep-last` on the embedded default: lists what it deletes."""
    with Workspace.open() as local:
        local.init()
        _history(local, models)
    dry = cli("gc", "--grace", "0", "--keep-last", "1", "--dry-run")
    assert dry.code == 0, dry
    assert "b: would delete version(s) 3, 4" in dry.out
    done = cli("gc", "--grace", "0", "--keep-last", "1")
    assert done.code == 0, done
    assert "b: deleted version(s) 3, 4" in done.out
    with Workspace.open() as local:
        assert [v.version for v in local.registry.list_versions("b")] == [1, 2, 5]
    refused = cli("gc", "--keep-last", "0")
    assert refused.code != 0
    assert "keep-last" in refused.err
