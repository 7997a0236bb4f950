"""The bundle lifecycle on the embedded default: local store + SQLite, real files.

The checkpoints are tiny BERTs saved by transformers' ``save_pretrained``: a bare
``BertModel`` base, and fine-tunes trained a few steps from it whose encoder sits under
``bert.``: ``alpha`` a sequence classifier in fp32, ``beta`` one saved in bf16, ``gamma``
a token classifier (no pooler).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from randes.config import TransformConfig
from randes.errors import CheckpointError, InvalidNameError
from storage.registry import TaskExistsError
from storage.workspace import Workspace
from tests.workspaces import make_models, open_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Iterator[Workspace]:
    with open_workspace(tmp_path / "home") as workspace:
        yield workspace


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved once for the module: no test writes into them."""
    shapes = {"beta": {"dtype": "bfloat16"}, "gamma": {"task": "BertForTokenClassification"}}
    return make_models(tmp_path_factory.mktemp("models"), ("alpha", "beta", "gamma"), shapes=shapes)


def _bundle(ws: Workspace, models: dict[str, Path], **config: object) -> None:
    ws.add_base("tiny", str(models["base"]))
    ws.create_bundle("b", "tiny", TransformConfig.model_validate(config))


def _max_rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-12)
    return float((got.double() - want.double()).abs().max() / scale)


@pytest.mark.parametrize("rank1", ["flip", "plain", "private"])
def test_one_task_comes_back_exactly(ws: Workspace, models, tmp_path: Path, rank1: str) -> None:
    _bundle(ws, models, rank1=rank1)
    outcome = ws.fold("b", str(models["alpha"]), "alpha", scale=1.0)
    assert (outcome.version, outcome.skipped) == (1, False)
    dest = ws.materialize("b", None, "alpha", tmp_path / "out", master=True)  # fp32: exact
    got = load_file(str(dest / "model.safetensors"))
    want = load_file(str(models["alpha"] / "model.safetensors"))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype
        if name.startswith("classifier.") or not tensor.is_floating_point():
            assert torch.equal(got[name], tensor), name
        else:
            assert _max_rel_error(got[name], tensor) < 1e-5, name
    want_config = json.loads((models["alpha"] / "config.json").read_text())
    assert json.loads((dest / "config.json").read_text()) == want_config


def test_prefixed_checkpoint_materializes_with_its_own_names(ws, models, tmp_path) -> None:
    _bundle(ws, models)
    ws.fold("b", str(models["gamma"]), "gamma", scale=1.0)
    got = load_file(str(ws.materialize("b", "1", "gamma", tmp_path / "g") / "model.safetensors"))
    assert "bert.encoder.layer.0.attention.self.query.weight" in got and "classifier.weight" in got
    assert not any("pooler" in name for name in got)  # the token classifier has none
    manifest = ws.resolve("b")[1]
    assert manifest.task("gamma").key_map.checkpoint_prefix == "bert."


def test_versions_chain_and_same_bytes_fold_once(ws, models) -> None:
    _bundle(ws, models)
    assert ws.fold("b", str(models["alpha"]), "alpha").version == 1
    assert ws.fold("b", str(models["beta"]), "beta").version == 2
    again = ws.fold("b", str(models["alpha"]), "alpha-again")
    assert again.skipped and again.task == "alpha" and again.version == 1
    versions = ws.registry.list_versions("b")
    assert [v.version for v in versions] == [1, 2]
    assert [v.parent_version for v in versions] == [None, 1]
    seeds = {t.name: t.seed for t in ws.registry.tasks("b")}
    assert set(seeds) == {"alpha", "beta"} and seeds["alpha"] != seeds["beta"]
    with pytest.raises(TaskExistsError):
        ws.fold("b", str(models["gamma"]), "alpha")


def test_remove_folds_a_task_out(ws, models, tmp_path) -> None:
    _bundle(ws, models)
    ws.fold("b", str(models["alpha"]), "alpha", scale=1.0)
    ws.fold("b", str(models["beta"]), "beta", scale=1.0)
    removed = ws.remove("b", "beta")
    assert removed.version == 3
    assert [t.name for t in ws.resolve("b")[1].tasks] == ["alpha"]
    out = ws.materialize("b", None, "alpha", tmp_path / "a", master=True)
    got = load_file(str(out / "model.safetensors"))
    want = load_file(str(models["alpha"] / "model.safetensors"))
    for name, tensor in want.items():
        if tensor.is_floating_point():
            assert _max_rel_error(got[name], tensor) < 1e-4, name


def test_pull_writes_a_verified_self_contained_copy(ws, models, tmp_path) -> None:
    _bundle(ws, models)
    ws.fold("b", str(models["alpha"]), "alpha")
    record = ws.pull("b", "1", tmp_path / "pulled", master=True)
    pointer = json.loads((tmp_path / "pulled" / "bundle.json").read_text())
    assert pointer["version"] == record.version == 1
    assert pointer["master"] is True
    assert (tmp_path / "pulled" / pointer["manifest_key"]).exists()
    manifest = ws.resolve("b", "1")[1]
    for ref in manifest.shards():  # --master: a complete copy
        assert (tmp_path / "pulled" / ref.key).stat().st_size == ref.size


def test_bad_inputs_are_refused_and_nothing_changes(ws, models, tmp_path) -> None:
    _bundle(ws, models)
    with pytest.raises(InvalidNameError):
        ws.fold("b", str(models["alpha"]), "../escape")
    with pytest.raises(CheckpointError):
        ws.fold("b", str(tmp_path / "missing"), "x")
    pickle_dir = tmp_path / "pickled"
    pickle_dir.mkdir()
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError):
        ws.fold("b", str(pickle_dir), "p")
    assert ws.registry.head("b") is None


def test_gc_reclaims_only_unreferenced_objects(ws, models) -> None:
    _bundle(ws, models)
    ws.fold("b", str(models["alpha"]), "alpha")
    orphan = "objects/00/" + "0" * 64
    ws.store.put_bytes(orphan, b"left by a crashed fold")
    assert ws.gc(grace_s=3600).deleted == []  # too young: might be a running fold's
    report = ws.gc(grace_s=0)
    assert report.deleted == [orphan]
    ws.materialize("b", None, "alpha", ws.settings.home / "after-gc")
