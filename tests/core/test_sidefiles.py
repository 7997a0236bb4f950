"""Which files of a model directory travel with its weights (randes.sidefiles)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from randes.checkpoint import CheckpointReader
from randes.manifest import TaskEntry
from randes.sidefiles import MAX_SIDE_FILE_BYTES, collect_side_files, st_weights_dir
from tests.core.helpers import save

SHA = "0" * 64


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def test_small_files_and_subfolders_kept_weights_and_pickles_not(tmp_path: Path) -> None:
    root = _tree(
        tmp_path / "m",
        {
            "config.json": b"{}",
            "chat_template.jinja": b"{{ messages }}",
            "tokenizer.json": b"{}",
            "modules.json": b"[]",
            "1_Pooling/config.json": b"{}",
            "2_Normalize/config.json": b"{}",
            "README.md": b"# m",
            "training_args.bin": b"pickle",
            "optimizer.pt": b"pickle",
            "onnx/model.onnx": b"weights",
            "adapter_model.safetensors.index.json": b"{}",
            "other.safetensors": b"x",
            ".git/config": b"x",
            ".cache/huggingface/x": b"x",
            "checkpoint-500/trainer_state.json": b"{}",
            "runs/events": b"x",
            "bad name.txt": b"x",
        },
    )
    save(root / "model.safetensors", {"w": torch.zeros(2)})
    assert sorted(collect_side_files(root)) == [
        "1_Pooling/config.json",
        "2_Normalize/config.json",
        "README.md",
        "chat_template.jinja",
        "config.json",
        "modules.json",
        "tokenizer.json",
    ]
    with CheckpointReader.open(root) as reader:
        assert "1_Pooling/config.json" in reader.side_files
        assert reader.weights_dir == ""


def test_large_file_stays_behind(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    with (root / "big.json").open("wb") as fh:
        fh.truncate(MAX_SIDE_FILE_BYTES + 1)
    (root / "config.json").write_text("{}")
    assert list(collect_side_files(root)) == ["config.json"]


def test_legacy_sentence_transformers_layout(tmp_path: Path) -> None:
    modules = [
        {"idx": 0, "name": "0", "path": "0_Transformer", "type": "x.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.models.Pooling"},
    ]
    root = _tree(
        tmp_path / "st",
        {
            "modules.json": json.dumps(modules).encode(),
            "1_Pooling/config.json": b"{}",
            "0_Transformer/config.json": b"{}",
        },
    )
    save(root / "0_Transformer" / "model.safetensors", {"w": torch.zeros(2)})
    assert st_weights_dir(root) == "0_Transformer"
    with CheckpointReader.open(root) as reader:
        assert reader.weights_dir == "0_Transformer"
        assert reader.keys() == ["w"]
        assert set(reader.side_files) == {
            "modules.json",
            "1_Pooling/config.json",
            "0_Transformer/config.json",
        }


def test_modules_json_cannot_point_outside(tmp_path: Path) -> None:
    modules = [{"path": "../elsewhere", "type": "Transformer"}]
    root = _tree(tmp_path / "st", {"modules.json": json.dumps(modules).encode()})
    save(tmp_path / "elsewhere" / "model.safetensors", {"w": torch.zeros(2)})
    assert st_weights_dir(root) is None


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a//b", "a/../b", ".hidden", "a\\b"])
def test_manifest_refuses_unsafe_side_file_paths(name: str) -> None:
    with pytest.raises(ValueError):
        TaskEntry.model_validate(_entry(files={name: _ref()}))


def test_manifest_takes_nested_side_files_and_old_entries() -> None:
    entry = TaskEntry.model_validate(_entry(files={"1_Pooling/config.json": _ref()}))
    assert "1_Pooling/config.json" in entry.files
    old = TaskEntry.model_validate(_entry())  # written before source_kind / weights_dir
    assert (old.source_kind, old.weights_dir, old.key_map.absent) == ("checkpoint", "", ())


def _ref() -> dict[str, object]:
    return {"key": f"objects/00/{SHA}", "sha256": SHA, "size": 2}


def _entry(**extra: object) -> dict[str, object]:
    return {
        "name": "t",
        "seed": 1,
        "source_uri": "file:///x",
        "source_sha256": SHA,
        "added_in_version": 1,
        "key_map": {"base_prefix": "", "checkpoint_prefix": "bert."},
        **extra,
    }
