"""ShardWriter: HF naming, size limit, index, atomicity, canonical bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from randes.checkpoint import CheckpointReader
from randes.writer import ShardWriter


def _tensors() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each


def test_single_shard(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=1 << 20)
    mixed = {
        "f": torch.randn(3, 2),
        "b": torch.randn(5).bfloat16(),
        "i": torch.arange(3),
        "flag": torch.tensor([True]),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
    }
    for k, v in mixed.items():
        w.add(k, v)
    (shard,) = w.finish(hf_index=True)
    assert shard.path == tmp_path / "model.safetensors"
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert shard.sha256 == hashlib.sha256(shard.path.read_bytes()).hexdigest()
    assert shard.size == shard.path.stat().st_size
    assert shard.tensors == sorted(mixed)
    loaded = load_file(str(shard.path))
    assert all(torch.equal(loaded[k], v) for k, v in mixed.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_sharding_and_index(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=40_000, prefix="model")
    for k, v in _tensors().items():
        w.add(k, v)
    shards = w.finish(hf_index=True)
    assert [s.path.name for s in shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert [len(s.tensors) for s in shards] == [2, 2, 1]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    with CheckpointReader.open(tmp_path) as r:  # HF layout readable by our own reader
        assert torch.equal(r.get("t3"), _tensors()["t3"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=100)
    w.add("small", torch.zeros(2))
    w.add("big", torch.zeros(1000))
    w.add("small2", torch.zeros(2))
    assert [s.tensors for s in w.finish()] == [["small"], ["big"], ["small2"]]


def test_bytes_are_canonical(tmp_path: Path) -> None:
    shas = []
    for run, order in enumerate([sorted(_tensors()), sorted(_tensors(), reverse=True)]):
        w = ShardWriter(tmp_path / str(run), max_shard_bytes=1 << 20)
        for k in order:
            w.add(k, _tensors()[k])
        shas.append(w.finish()[0].sha256)
    assert shas[0] == shas[1]


def test_abort_and_errors(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=20_000)
    for k, v in _tensors().items():
        w.add(k, v)
    with pytest.raises(ValueError, match="twice"):
        w.add("t0", torch.zeros(1))
    assert any(tmp_path.iterdir())  # flushed temp shards exist
    w.abort()
    assert not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        w.add("x", torch.zeros(1))
    assert ShardWriter(tmp_path, max_shard_bytes=10).finish() == []


def test_views_do_not_pin_storage(tmp_path: Path) -> None:
    big = torch.randn(1000, 10)
    w = ShardWriter(tmp_path, max_shard_bytes=1 << 20)
    w.add("row", big[3])
    w.add("col", big[:, 2])
    (shard,) = w.finish()
    loaded = load_file(str(shard.path))
    assert torch.equal(loaded["row"], big[3]) and torch.equal(loaded["col"], big[:, 2])
