"""Registry queries through the command line, on SQLite and PostgreSQL.

`randes --version`, `base list`, `bundle list`, `bundle show` and the `tasks` filters.
The JSON keys are a documented contract (README, "Registry queries"): these tests pin
them, and check the values against what the workspace computes by another path (the
lambda from the base's own headers, sizes from the stored objects).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from importlib.metadata import version as package_version
from pathlib import Path

import pytest

from randes.config import TransformConfig
from storage.readers import open_base
from storage.workspace import Workspace
from tests.cli_run import cli
from tests.hf_models import save_base, save_finetune

BUNDLE = "q"
BASE = "qbase"

BASE_KEYS = {"name", "uri", "sha256", "manifest_key", "created_at"}
BUNDLE_KEYS = {
    "name",
    "base",
    "transform",
    "gate_threshold",
    "head_version",
    "head_status",
    "tasks",
    "aliases",
    "bytes",
    "created_at",
}
SHOW_KEYS = {
    "bundle",
    "version",
    "parent_version",
    "status",
    "aliases",
    "created_at",
    "base",
    "transform",
    "serving",
    "sizes",
    "manifest_key",
    "manifest_sha256",
    "tasks",
}
SIZE_KEYS = {"master_bytes", "serving_bytes", "private_bytes", "side_file_bytes", "total_bytes"}
SHOW_TASK_KEYS = {
    "name",
    "seed",
    "added_in_version",
    "source_uri",
    "source_sha256",
    "scale_override",
    "lambda",
    "interference",
    "private_bytes",
    "evaluations",
}
TASK_KEYS = {
    "bundle",
    "task",
    "seed",
    "added_in_version",
    "removed_in_version",
    "source_uri",
    "source_sha256",
}


def cli_json(*argv: str) -> object:
    result = cli(*argv, "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


@pytest.fixture
def populated(
    registry_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Workspace]:
    """Bundle ``q`` on ``registry_url``: tasks a, b, c folded (versions 1-3), c removed
    (version 4), an evaluation of version 2 and ``production`` -> 2."""
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RANDES_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RANDES_DATABASE_URL", registry_url)
    monkeypatch.setenv("COLUMNS", "200")
    base = save_base(tmp_path / "models" / "base")  # BERT, by transformers' save_pretrained
    ws = Workspace.open()
    ws.init()
    ws.add_base(BASE, str(base))
    ws.create_bundle(BUNDLE, BASE, TransformConfig())
    shapes = ({}, {"dtype": "bfloat16"}, {"task": "BertForTokenClassification"})
    for seed, task in enumerate(("a", "b", "c")):
        src = save_finetune(base, tmp_path / "models" / task, seed, **shapes[seed])
        ws.fold(BUNDLE, str(src), task)
    ws.remove(BUNDLE, "c")
    ws.registry.set_status(BUNDLE, 2, "validated")
    ws.registry.add_evaluation(BUNDLE, 2, "a", "accuracy", 0.9, 1.0, 0.9)
    ws.registry.set_alias(BUNDLE, "production", 2)
    yield ws
    ws.close()


def test_version_flag() -> None:
    result = cli("--version")
    assert result.code == 0
    assert result.out.strip() == f"randes {package_version('randes-pipeline')}"


def check_base_list(populated: Workspace) -> None:
    rows = cli_json("base", "list")
    assert isinstance(rows, list) and len(rows) == 1
    assert set(rows[0]) == BASE_KEYS
    assert rows[0]["name"] == BASE
    assert rows[0]["sha256"] == populated.registry.get_base(BASE).sha256
    table = cli("base", "list")
    assert table.code == 0 and BASE in table.out


def check_bundle_list(populated: Workspace) -> None:
    rows = cli_json("bundle", "list")
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert set(row) == BUNDLE_KEYS
    assert (row["name"], row["base"], row["head_version"], row["tasks"]) == (BUNDLE, BASE, 4, 2)
    assert row["aliases"] == {"production": 2}
    head = populated.manifest(populated.registry.head(BUNDLE))  # type: ignore[arg-type]
    stored = sum(
        populated.store.stat(ref.key).size for ref in head.shards()
    )  # the objects themselves, not the manifest's claims
    assert row["bytes"] == stored > 0
    table = cli("bundle", "list")
    assert table.code == 0 and "production@2" in table.out


def check_bundle_show(populated: Workspace) -> None:
    summary = cli_json("bundle", "show", f"{BUNDLE}@production")
    assert isinstance(summary, dict)
    assert set(summary) == SHOW_KEYS and set(summary["sizes"]) == SIZE_KEYS
    assert (summary["version"], summary["status"], summary["aliases"]) == (
        2,
        "published",
        ["production"],
    )
    assert [t["name"] for t in summary["tasks"]] == ["a", "b"]
    assert all(set(t) == SHOW_TASK_KEYS for t in summary["tasks"])
    _, manifest = populated.resolve(BUNDLE, "2")
    # the lambda by the other path
    with open_base(populated.files, populated.base_of(manifest)) as base:
        for shown, entry in zip(summary["tasks"], manifest.tasks, strict=True):
            assert shown["seed"] == entry.seed
            assert shown["lambda"] == pytest.approx(populated.task_scale(manifest, entry, base))
            assert 0 < shown["lambda"] < 1 and shown["interference"] > 0
    assert summary["tasks"][0]["evaluations"] == [
        {"metric": "accuracy", "value": 0.9, "reference": 1.0, "normalized": 0.9}
    ]
    sizes = summary["sizes"]
    assert sizes["master_bytes"] == sum(s.size for s in manifest.superposition) > 0
    assert 0 < sizes["serving_bytes"] < sizes["master_bytes"]  # int4 by default
    head = cli_json("bundle", "show", BUNDLE)
    assert isinstance(head, dict) and head["version"] == 4 and head["status"] == "staged"
    table = cli("bundle", "show", f"{BUNDLE}@2")
    assert table.code == 0 and "lambda" in table.out and "90.0%" in table.out


def check_tasks_filters(populated: Workspace) -> None:
    now = cli_json("tasks", BUNDLE)
    assert isinstance(now, list) and [r["task"] for r in now] == ["a", "b"]
    assert all(set(r) == TASK_KEYS for r in now)
    at1 = cli_json("tasks", BUNDLE, "--version", "1")
    assert isinstance(at1, list) and [r["task"] for r in at1] == ["a"]
    at3 = cli_json("tasks", BUNDLE, "--version", "3")
    assert isinstance(at3, list) and [r["task"] for r in at3] == ["a", "b", "c"]
    everything = cli_json("tasks", BUNDLE, "--all")
    assert isinstance(everything, list)
    removed = {r["task"]: r["removed_in_version"] for r in everything}
    assert removed == {"a": None, "b": None, "c": 4}


QUERY_ERRORS = [
    (("bundle", "show", "nope"), "bundle 'nope' does not exist"),
    (("bundle", "show", f"{BUNDLE}@staging"), "staging"),
    (("tasks", BUNDLE, "--version", "99"), "99"),
    (("tasks", "--version", "1"), "--version needs a BUNDLE"),
]


def test_registry_queries(populated: Workspace) -> None:
    """Every query on one populated registry (built once per backend: folds are slow)."""
    check_base_list(populated)
    check_bundle_list(populated)
    check_bundle_show(populated)
    check_tasks_filters(populated)
    for argv, needle in QUERY_ERRORS:
        result = cli(*argv)
        assert result.code in (1, 2), argv
        lines = result.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (
            argv,
            result.err,
        )
