"""The commit primitive (`storage.commit.commit`) on a real local store and SQLite.

- one change may add several tasks: one version holds them all (seeds, ledger rows,
  norms), and its master is byte for byte what committing them one at a time gives;
- a build that refuses writes nothing; a build that finds its change already in is a
  no-op; a writer that always loses the race gives up with FoldContentionError.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import source_digests
from randes.fold import fold
from randes.manifest import TaskEntry
from randes.rng import new_task_seed
from storage.commit import (
    AddTask,
    Change,
    FoldContentionError,
    NoChange,
    Parent,
    Upload,
    commit,
)
from storage.readers import open_superposition
from storage.workspace import Workspace
from tests.workspaces import make_models, open_workspace


@pytest.fixture
def ws(tmp_path: Path, local_store: Any, sqlite_url: str) -> Iterator[Workspace]:
    with open_workspace(tmp_path / "home", sqlite_url, local_store) as workspace:
        yield workspace


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    return make_models(tmp_path / "models", "abc")


def _setup(ws: Workspace, models: dict[str, Path], *bundles: str) -> None:
    ws.add_base("tiny", str(models["base"]))
    for bundle in bundles:
        ws.create_bundle(bundle, "tiny", TransformConfig())


def _fold_build(ws: Workspace, models: dict[str, Path], bundle: str, tasks: dict[str, int]) -> Any:
    """A build folding ``tasks`` (name -> seed) one after the other onto the parent, in
    one pass per task, committed as ONE change."""

    def build(parent: Parent, work: Path) -> Change:
        config = ws.bundle_config(bundle)
        added, result = [], None
        with ws.open_base("tiny") as base:
            previous: CheckpointReader | None = None
            for i, (task, seed) in enumerate(tasks.items()):
                with (
                    CheckpointReader.open(models[task]) as checkpoint,
                    open_superposition(ws.files, parent.manifest) as stored,
                ):
                    result = fold(
                        base=base,
                        checkpoint=checkpoint,
                        parent=previous if previous is not None else stored,
                        seed=seed,
                        config=config,
                        out_dir=work / str(i),
                    )
                    digest = source_digests(checkpoint).content
                if previous is not None:
                    previous.close()
                previous = CheckpointReader.from_files([s.path for s in result.superposition])
                entry = TaskEntry(
                    name=task,
                    seed=seed,
                    source_uri=str(models[task]),
                    source_sha256=digest,
                    added_in_version=1,  # the commit sets the version it lands in
                    key_map=result.key_map,
                    delta_norms=result.delta_norms,
                )
                added.append(AddTask(entry, ledger=(digest,)))
            if previous is not None:
                previous.close()
        assert result is not None
        return Change(
            superposition=tuple(Upload.of_shard(s) for s in result.superposition),
            serving=tuple(Upload.of_shard(s) for s in result.serving),
            add=tuple(added),
        )

    return build


def test_one_change_adds_several_tasks_as_one_version(
    ws: Workspace, models: dict[str, Path], tmp_path: Path
) -> None:
    _setup(ws, models, "batch", "one-by-one")
    seeds = {"a": new_task_seed(), "b": new_task_seed(), "c": new_task_seed()}
    ws.fold("batch", str(models["a"]), "a")  # a parent with a task of its own
    head = ws.registry.head("batch")
    assert head is not None
    parent_seed = ws.manifest(head).task("a").seed

    done = commit(
        ws.store,
        ws.registry,
        "batch",
        _fold_build(ws, models, "batch", {"b": seeds["b"], "c": seeds["c"]}),
        work_root=ws.work_root,
    )
    assert done.record is not None and done.record.version == 2
    _, manifest = ws.resolve("batch")
    assert [(t.name, t.added_in_version) for t in manifest.tasks] == [("a", 1), ("b", 2), ("c", 2)]
    assert {t.name: t.seed for t in ws.registry.tasks("batch")} == {
        "a": parent_seed,
        "b": seeds["b"],
        "c": seeds["c"],
    }
    assert all(t.delta_norms for t in manifest.tasks)
    # The ledger knows both checkpoints: folding either again is a no-op.
    assert ws.fold("batch", str(models["c"]), "c-again").skipped

    # The same seeds committed one task per version: the same master, byte for byte.
    for task, seed in (("a", parent_seed), ("b", seeds["b"]), ("c", seeds["c"])):
        commit(
            ws.store,
            ws.registry,
            "one-by-one",
            _fold_build(ws, models, "one-by-one", {task: seed}),
            work_root=ws.work_root,
        )
    _, sequential = ws.resolve("one-by-one")
    assert sequential.version == 3
    assert [r.sha256 for r in sequential.superposition] == [
        r.sha256 for r in manifest.superposition
    ]
    out = ws.materialize("batch", None, "c", tmp_path / "c")
    assert (out / "model.safetensors").is_file()


def test_a_refusing_build_writes_nothing_and_a_done_change_is_a_no_op(
    ws: Workspace, models: dict[str, Path]
) -> None:
    _setup(ws, models, "b")
    stored = {i.key for i in ws.store.list("")}

    def refuse(parent: Parent, work: Path) -> Change:
        (work / "half-written").write_bytes(b"x")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        commit(ws.store, ws.registry, "b", refuse, work_root=ws.work_root)
    assert ws.registry.head("b") is None
    assert {i.key for i in ws.store.list("")} == stored
    assert list(ws.work_root.iterdir()) == []

    done = commit(ws.store, ws.registry, "b", lambda p, w: NoChange("t", 7), work_root=ws.work_root)
    assert (done.record, done.skipped, done.attempts) == (None, NoChange("t", 7), 1)


def test_a_writer_that_always_loses_the_race_gives_up(
    ws: Workspace, models: dict[str, Path]
) -> None:
    _setup(ws, models, "b")
    racers = iter(["b", "c"])
    inner = _fold_build(ws, models, "b", {"a": new_task_seed()})

    def build(parent: Parent, work: Path) -> Change:
        change = inner(parent, work)
        racer = next(racers)
        ws.fold("b", str(models[racer]), f"racer-{racer}")  # takes the next number first
        return change

    with pytest.raises(FoldContentionError, match="lost the race"):
        commit(ws.store, ws.registry, "b", build, work_root=ws.work_root, max_attempts=2)
    assert [t.name for t in ws.registry.tasks("b")] == ["racer-b", "racer-c"]
