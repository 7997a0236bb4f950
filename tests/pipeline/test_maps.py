"""Bundles written before the sign-map setting existed keep column flips, bit for bit.

- a version pulled by the pre-map code (tests/fixtures/legacy_columns, made with commit
  22983b5 by its make_fixture.py) reads as ``map="columns"`` and materializes, from the
  serving copy and from the fp32 master, to exactly the bytes that code wrote;
- a registry row without ``map`` (an old `bundle create`) keeps folding column flips:
  its next versions are retrieved with the column map, never the new default;
- new bundles record their map in the registry and in every manifest;
- the command line's --map of `bundle create` / `group create`.

New folds take tiny BERTs saved by transformers' ``save_pretrained`` (a bare base; an
fp32 and a bf16 sequence classifier).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.cli import main
from randes.capacity import default_limit
from randes.checkpoint import CheckpointReader
from randes.config import DEFAULT_MAP, LEGACY_MAP, TransformConfig, stored_config
from randes.manifest import load_bundle_manifest
from randes.retrieve import retrieve
from storage.pulled import PulledVersion
from storage.readers import open_superposition
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune
from tests.workspaces import open_workspace

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_columns"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_old_pulled_version_materializes_bit_identically(tmp_path: Path) -> None:
    root = tmp_path / "pulled"
    shutil.copytree(FIXTURE / "pulled", root)
    expected = json.loads((FIXTURE / "expected.json").read_text())
    version = PulledVersion(root)
    assert version.manifest.transform.map == LEGACY_MAP == "columns"
    manifests = [json.loads(p.read_text()) for p in (root / "manifests").glob("*.json")]
    bundle_manifests = [m for m in manifests if "transform" in m]
    assert bundle_manifests and all("map" not in m["transform"] for m in bundle_manifests)
    for key, sha in expected.items():
        task, source = key.split("/")
        dest = tmp_path / f"out-{task}-{source}"
        version.materialize(task, dest, master=source == "master")
        assert _sha256(dest / "model.safetensors") == sha, key


def test_stored_configs_without_map_are_columns() -> None:
    old = {"sign_flip": True, "layer_shuffle": True, "rank1": "flip", "dtype": "float32"}
    assert stored_config(old).map == "columns"
    assert stored_config({**old, "map": "two-sided"}).map == "two-sided"
    assert TransformConfig().map == DEFAULT_MAP  # a new bundle gets the default
    manifest = next(
        p
        for p in (FIXTURE / "pulled" / "manifests").glob("*.json")
        if b"transform" in p.read_bytes()
    )
    assert load_bundle_manifest(manifest.read_bytes()).transform.map == "columns"


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    with open_workspace(tmp_path / "home") as workspace:
        yield workspace


def test_old_registry_row_keeps_folding_column_flips(ws: Workspace, tmp_path: Path) -> None:
    base_dir = save_base(tmp_path / "models" / "base")
    tasks = {
        "a": save_finetune(base_dir, tmp_path / "models" / "a", 0),
        "b": save_finetune(base_dir, tmp_path / "models" / "b", 1, dtype="bfloat16"),
    }
    ws.add_base("tiny", str(base_dir))
    legacy = TransformConfig(map="columns", rank1="flip").model_dump(mode="json")
    del legacy["map"]  # what `bundle create` stored before the setting existed
    ws.registry.create_bundle("old", "tiny", legacy)
    for name, path in tasks.items():
        ws.fold("old", str(path), name, scale=1.0)
    _, manifest = ws.resolve("old")
    assert manifest.transform.map == "columns"
    columns = TransformConfig(map="columns", rank1="flip")
    entry = manifest.task("a")
    dest = ws.materialize("old", None, "a", tmp_path / "out", master=True)
    got = load_file(str(dest / "model.safetensors"))
    with open_superposition(ws.files, manifest) as sup, CheckpointReader.open(base_dir) as base:

        def retrieved(config: TransformConfig) -> dict[str, torch.Tensor]:
            return dict(
                retrieve(
                    base=base,
                    superposition=sup,
                    private=None,  # rank1 "flip": only the task head is private
                    seed=entry.seed,
                    key_map=entry.key_map,
                    config=config,
                    scale=1.0,
                )
            )

        want = retrieved(columns)
        other = retrieved(TransformConfig(map=DEFAULT_MAP, rank1="flip"))
    assert want.keys() <= got.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    weight = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(other[weight], want[weight])


def test_new_bundles_record_their_map(ws: Workspace, tmp_path: Path) -> None:
    base_dir = save_base(tmp_path / "models" / "base")
    ws.add_base("tiny", str(base_dir))
    ws.create_bundle("new", "tiny", TransformConfig(map="two-sided"))
    assert ws.registry.get_bundle("new").transform["map"] == "two-sided"
    ws.fold("new", str(save_finetune(base_dir, tmp_path / "models" / "a", 1)), "a")
    record, manifest = ws.resolve("new")
    raw = json.loads(ws.store.get_bytes(record.manifest_key, sha256=record.manifest_sha256))
    assert raw["transform"]["map"] == "two-sided" == manifest.transform.map


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_map_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bundle create` and `group create` take --map; the default is DEFAULT_MAP; a wrong
    value is one error line and creates nothing."""
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RANDES_HOME", str(tmp_path / "home"))
    base_dir = save_base(tmp_path / "models" / "base")
    for argv in (["init"], ["base", "add", "tiny", str(base_dir)]):
        assert _cli(*argv)[0] == 0
    assert _cli("bundle", "create", "two", "--base", "tiny", "--map", "two-sided")[0] == 0
    assert _cli("bundle", "create", "dflt", "--base", "tiny")[0] == 0
    code, _, err = _cli("bundle", "create", "bad", "--base", "tiny", "--map", "rows")
    assert code != 0 and err.startswith("error:") and len(err.strip().splitlines()) == 1
    code, _, _ = _cli("group", "create", "grp", "--base", "tiny", "--map", "columns")
    assert code == 0
    with Workspace.open() as ws:
        assert ws.bundle_config("two").map == "two-sided"
        assert ws.bundle_config("dflt").map == DEFAULT_MAP
        assert [b.name for b in ws.registry.list_bundles()] == ["dflt", "two"]
        group = ws.registry.get_group("grp")
        assert stored_config(group.transform).map == "columns"
        assert group.max_interference == default_limit("columns")
