"""Bundle groups end to end: placement by capacity, queries and pulls across members.

Real files, the local store and a real registry (SQLite; PostgreSQL too for the race).
The checkpoints are tiny BERT classifiers saved by transformers' ``save_pretrained``,
trained two Adam steps from a bare ``BertModel`` base. Interference is controlled by the
size of the deltas, set by the learning rate (Adam moves every weight by ~lr a step): a
fine-tune at lr 1e-2 makes every other task of its bundle hear r ~ 0.023 (over the
groups' limit of 0.01), one at 1e-3 only r ~ 0.00025, so the expected placement is known
in advance:

- large deltas each get a member of their own, small ones share one; every member's
  largest r_t stays within the limit;
- the same checkpoint again is a no-op (under any name), a task name used in any member
  is refused, and nothing changes either way;
- materialize finds the member holding a task (at its head or an alias), pull writes
  every member into one verified store layout;
- two placements that both find the group full race to create the same member: both
  land, the member is created once;
- the ingest flow places through the group; the command line's group forms, and its
  bad input (one ``error:`` line, no traceback).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from randes import capacity
from randes.config import TransformConfig, stored_config
from randes.layout import superposed_names
from randes.scaling import noise_gain, shrinkage
from storage import groups
from storage.cache import file_sha256
from storage.pulled import pulled_shards
from storage.registry import GroupNotFoundError, Registry
from storage.settings import Settings
from storage.workspace import Workspace
from tests.cli_run import cli
from tests.hf_models import save_base, save_finetune

BASE = "tiny"
GROUP = "g"
LIMIT = 0.01
LARGE, SMALL = 1e-2, 1e-3  # learning rates of the fine-tunes
# placement order -> where each task must land
ORDER = ["big1", "small1", "big2", "small2", "small3"]
EXPECTED = {"g-1": ["big1"], "g-2": ["small1", "small2", "small3"], "g-3": ["big2"]}


@dataclass
class World:
    home: Path
    models: Path
    sources: dict[str, Path]

    def workspace(self) -> Workspace:
        return Workspace(Settings(home=self.home))


def _models(root: Path, names: dict[str, float], first_seed: int = 1) -> dict[str, Path]:
    """``{name: fine-tune trained at names[name]}`` under ``root/in``, base in ``root/base``."""
    base = root / "base"
    if not base.exists():
        save_base(base)
    return {
        name: save_finetune(base, root / "in" / name, first_seed + i, lr=lr)
        for i, (name, lr) in enumerate(names.items())
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One group filled in ORDER; the read-only tests below share it."""
    root = tmp_path_factory.mktemp("groups")
    sources = _models(root / "models", {n: LARGE if n.startswith("big") else SMALL for n in ORDER})
    sources |= _models(root / "models", {"late": SMALL}, first_seed=99)
    w = World(root / "home", root / "models", sources)
    with w.workspace() as ws:
        ws.init()
        ws.add_base(BASE, str(root / "models" / "base"))
        groups.create_group(ws, GROUP, BASE, TransformConfig(), max_interference=LIMIT)
        for name in ORDER:
            placement = groups.place(ws, GROUP, str(sources[name]), name)
            assert not placement.outcome.skipped and not placement.over_limit
    yield w


def _member_tasks(reg: Registry, group: str) -> dict[str, list[str]]:
    return {m.name: [t.name for t in reg.tasks(m.name)] for m in reg.group_members(group)}


def _heads(reg: Registry, group: str) -> dict[str, int | None]:
    out = {}
    for m in reg.group_members(group):
        head = reg.head(m.name)
        out[m.name] = None if head is None else head.version
    return out


# ---------------------------------------------------------------- placement
def test_large_deltas_get_their_own_member_small_ones_share(world: World) -> None:
    with world.workspace() as ws:
        assert _member_tasks(ws.registry, GROUP) == EXPECTED
        record, members = groups.show(ws, GROUP)
        assert record.max_interference == LIMIT
        loads = {m.bundle: m for m in members}
        assert all(m.max_interference <= LIMIT for m in members)
        assert loads["g-1"].max_interference == 0.0  # alone: no interference, lambda 1
        assert loads["g-1"].tasks[0].data_free_scale == 1.0
        small = loads["g-2"].tasks
        assert all(0 < t.interference < LIMIT / 10 for t in small)
        for t in small:
            gain = noise_gain(stored_config(record.transform).map)  # the group's map's law
            assert t.data_free_scale == pytest.approx(shrinkage(t.interference, gain))

        # the prediction that kept big2 out of g-1: together they would break the limit
        config = TransformConfig()
        with ws.open_base(BASE) as base:
            names = superposed_names(base, config)
        pair = groups.member_norms(ws, "g-1") | groups.member_norms(ws, "g-3")
        pair_load = capacity.interference(pair, ws.base_manifest(BASE).norms, names)
        assert min(pair_load.values()) > LIMIT


def test_same_checkpoint_again_is_a_no_op_and_names_are_unique(world: World) -> None:
    with world.workspace() as ws:
        before = _heads(ws.registry, GROUP)
        again = groups.place(ws, GROUP, str(world.sources["small2"]), "small2")
        assert again.outcome.skipped
        assert (again.member, again.outcome.task) == ("g-2", "small2")
        renamed = groups.place(ws, GROUP, str(world.sources["big2"]), "other-name")
        assert renamed.outcome.skipped and renamed.outcome.task == "big2"
        # a new checkpoint under a name another member holds
        with pytest.raises(groups.GroupTaskExistsError, match="'big2' \\(in bundle 'g-3'\\)"):
            groups.place(ws, GROUP, str(world.sources["late"]), "big2")
        with pytest.raises(GroupNotFoundError):
            groups.place(ws, "nope", str(world.sources["late"]), "late")
        assert _heads(ws.registry, GROUP) == before
        assert _member_tasks(ws.registry, GROUP) == EXPECTED


# ------------------------------------------------------- materialize and pull
def test_materialize_finds_the_member(world: World, tmp_path: Path) -> None:
    with world.workspace() as ws:
        record = groups.materialize(ws, GROUP, None, "small2", tmp_path / "via-group")
        assert (record.bundle, record.version) == ("g-2", 3)
        ws.materialize("g-2", None, "small2", tmp_path / "direct")
        via = load_file(str(tmp_path / "via-group" / "model.safetensors"))
        direct = load_file(str(tmp_path / "direct" / "model.safetensors"))
        assert via.keys() == direct.keys()
        assert all(via[k].equal(direct[k]) for k in via)

        with pytest.raises(groups.GroupTaskNotFoundError, match="'nope' at its head"):
            groups.find_task(ws, GROUP, "nope", None)
        with pytest.raises(ValueError, match="version 2 names a version of one bundle"):
            groups.find_task(ws, GROUP, "small2", "2")


def test_pull_every_member_into_one_store(world: World, tmp_path: Path) -> None:
    dest = tmp_path / "pulled"
    with world.workspace() as ws:
        result = groups.pull(ws, GROUP, None, dest)
        assert [(r.bundle, r.version) for r in result.pulled] == [
            ("g-1", 1),
            ("g-2", 3),
            ("g-3", 1),
        ]
        summary = json.loads((dest / "group.json").read_text())
        assert {m["bundle"]: m["tasks"] for m in summary["members"]} == EXPECTED
        base = ws.base_manifest(BASE)
        for record in result.pulled:
            pointer = json.loads((dest / "bundles" / f"{record.bundle}.json").read_text())
            assert pointer["manifest_sha256"] == record.manifest_sha256
            manifest = ws.manifest(record)
            wanted = [*pulled_shards(manifest, master=False), *base.shards]
            for ref in wanted:
                assert file_sha256(dest / ref.key) == ref.sha256
            assert file_sha256(dest / record.manifest_key) == record.manifest_sha256
        with pytest.raises(Exception, match="not an empty directory"):
            groups.pull(ws, GROUP, None, dest)


def test_alias_picks_published_members_only(world: World, tmp_path: Path) -> None:
    with world.workspace() as ws:
        head = ws.registry.head("g-2")
        assert head is not None
        ws.registry.set_status("g-2", head.version, "validated")
        ws.registry.set_alias("g-2", "production", head.version)
        record = groups.find_task(ws, GROUP, "small1", "production")
        assert (record.bundle, record.version) == ("g-2", head.version)
        with pytest.raises(groups.GroupTaskNotFoundError, match="at 'production'"):
            groups.find_task(ws, GROUP, "big1", "production")  # g-1 published nothing
        result = groups.pull(ws, GROUP, "production", tmp_path / "prod")
        assert [r.bundle for r in result.pulled] == ["g-2"]
        assert result.skipped == ["g-1", "g-3"]
        with pytest.raises(groups.GroupRefNotFoundError):
            groups.pull(ws, GROUP, "staging", tmp_path / "none")


# --------------------------------------------------------------- concurrency
def test_racing_placements_create_one_member_and_both_land(
    registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = _models(tmp_path / "models", {"a": LARGE, "b": LARGE, "c": LARGE})
    settings = Settings(home=tmp_path / "home", database_url=registry_url)
    with Workspace(settings) as ws:
        ws.init()
        ws.add_base(BASE, str(tmp_path / "models" / "base"))
        groups.create_group(ws, GROUP, BASE, TransformConfig(), max_interference=LIMIT)
        groups.place(ws, GROUP, str(sources["a"]), "a")  # g-1 holds a: b and c do not fit

    # Both placements must have found the group full before either creates a member.
    barrier = threading.Barrier(2, timeout=60)
    create = Registry.create_group_member
    waited = threading.local()

    def create_after_both_decided(self: Registry, group: str, position: int) -> Any:
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait()
        return create(self, group, position)

    monkeypatch.setattr(Registry, "create_group_member", create_after_both_decided)
    results: dict[str, groups.Placement | BaseException] = {}

    def run(task: str) -> None:
        try:
            with Workspace(settings) as mine:
                results[task] = groups.place(mine, GROUP, str(sources[task]), task)
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[task] = exc

    threads = [threading.Thread(target=run, args=(t,)) for t in ("b", "c")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    placements = [results[t] for t in ("b", "c")]
    assert all(isinstance(p, groups.Placement) for p in placements), placements
    done = [p for p in placements if isinstance(p, groups.Placement)]
    assert not any(p.outcome.skipped for p in done)
    assert max(p.attempts for p in done) >= 2  # the loser of the race placed again

    with Workspace(settings) as ws:
        members = _member_tasks(ws.registry, GROUP)
    names = list(members)
    assert names == [f"g-{i}" for i in range(1, len(names) + 1)]  # no member twice
    assert len(names) in (2, 3)  # 3 when the loser saw b (or c) committed in g-2
    placed = sorted(t for tasks in members.values() for t in tasks)
    assert placed == ["a", "b", "c"]
    assert members["g-1"] == ["a"]


# ------------------------------------------------------------------- the flow
@pytest.mark.usefixtures("prefect_harness")
def test_ingest_flow_places_through_the_group(randes_home: Path, tmp_path: Path) -> None:
    from flows.pipeline import ingest_flow

    sources = _models(tmp_path / "models", {"big": LARGE, "small": SMALL, "tiny": SMALL})
    with Workspace.open() as ws:
        ws.init()
        ws.add_base(BASE, str(tmp_path / "models" / "base"))
        groups.create_group(ws, GROUP, BASE, TransformConfig(), max_interference=LIMIT)
    summary = ingest_flow(None, str(sources["big"].parent), group=GROUP)
    assert summary["placed"] == {"big": "g-1@1", "small": "g-2@1", "tiny": "g-2@2"}
    assert summary["status"] == "validated"
    with Workspace.open() as ws:
        assert [v.status for v in ws.registry.list_versions("g-1")] == ["validated"]
        assert [v.status for v in ws.registry.list_versions("g-2")] == ["staged", "validated"]
    again = ingest_flow(None, str(sources["big"].parent), group=GROUP, run_validation=False)
    assert again["folded"] == [] and sorted(again["skipped"]) == ["big", "small", "tiny"]
    with pytest.raises(Exception, match="exactly one of a bundle and a group"):
        ingest_flow("b", str(sources["big"].parent), group=GROUP)


# ------------------------------------------------------------ command line
@pytest.fixture
def world_env(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANDES_HOME", str(world.home))
    monkeypatch.setenv("COLUMNS", "200")
    return world


def test_cli_group_queries(world_env: World) -> None:
    listed = cli("tasks", "--group", GROUP, "--json")
    assert listed.code == 0, listed.err
    rows = json.loads(listed.out)
    by_member: dict[str, list[str]] = {}
    for row in rows:
        by_member.setdefault(row["bundle"], []).append(row["task"])
    assert by_member == EXPECTED

    shown = cli("group", "show", GROUP, "--json")
    assert shown.code == 0, shown.err
    data = json.loads(shown.out)
    assert [m["bundle"] for m in data["members"]] == list(EXPECTED)
    assert all(t["interference"] <= LIMIT for m in data["members"] for t in m["tasks"])

    table = cli("group", "show", GROUP)
    assert table.code == 0 and "small3" in table.out and "lambda" in table.out

    again = cli("fold", "--group", GROUP, str(world_env.sources["big1"]), "big1")
    assert again.code == 0 and "nothing to do" in again.out and again.err == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tasks", "--group", "nope"], "bundle group 'nope' does not exist"),
        (["group", "show", "nope"], "bundle group 'nope' does not exist"),
        (["ingest", "--group", "nope", "."], "bundle group 'nope' does not exist"),
        (["pull", "--group", "nope", "dest"], "bundle group 'nope' does not exist"),
        (["group", "create", "a/b", "--base", BASE], "invalid group name"),
        (["group", "create", GROUP, "--base", BASE], "bundle group 'g' already exists"),
        (["group", "create", "h", "--base", "nobase"], "base model 'nobase' is not registered"),
        (["group", "create", "h", "--base", BASE, "--max-interference", "0"], "finite number"),
        (["materialize", "--group", "g@3", "small1", "dest"], "names a version of one bundle"),
        (["materialize", "--group", GROUP, "nope", "dest"], "holds task 'nope'"),
        (["fold", "--group", GROUP, "SRC:late", "bad name"], "invalid task name"),
        (["fold", "--group", GROUP, "SRC:late", "big2"], "already has a task 'big2'"),
        (["fold", "--group", GROUP, "SRC:big1", "renamed"], "already in group 'g' as task"),
        (["fold", "--group", GROUP, "SRC:late"], "give the task name once"),
        (["pull", "--group"], "Missing argument"),
    ],
)
def test_cli_bad_input_is_one_line(
    world_env: World, tmp_path: Path, argv: list[str], message: str
) -> None:
    argv = [str(world_env.sources[a[4:]]) if a.startswith("SRC:") else a for a in argv]
    argv = [str(tmp_path / a) if a == "dest" else a for a in argv]
    with world_env.workspace() as ws:
        before = (_heads(ws.registry, GROUP), [g.name for g in ws.registry.list_groups()])
    result = cli(*argv)
    assert result.code != 0
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert message in lines[0]
    assert "Traceback" not in result.err + result.out
    with world_env.workspace() as ws:
        after = (_heads(ws.registry, GROUP), [g.name for g in ws.registry.list_groups()])
    assert after == before
    assert not (tmp_path / "dest").exists()
