"""ShardWriter: planned streaming, HF naming, size limit, index, atomicity, canonical bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from randes.checkpoint import CheckpointReader
from randes.writer import ShardWriter, TensorSpec, WrittenShard


def _tensors() -> dict[str, torch.Tensor]:
    return {f"t{i}": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f": torch.randn(3, 2, generator=g),
        "b": torch.randn(5, generator=g).bfloat16(),
        "h": torch.randn(7, generator=g).half(),
        "i": torch.arange(3),
        "flag": torch.tensor([True]),
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
    }


def _plan(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec.of(k, v) for k, v in tensors.items()]


def _write(
    out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, *, hf_index: bool = False
) -> list[WrittenShard]:
    w = ShardWriter(out, max_shard_bytes=max_shard_bytes, plan=_plan(tensors))
    assert sorted(w.order) == sorted(tensors)
    for name in w.order:
        w.add(name, tensors[name])
    return w.finish(hf_index=hf_index)


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8 : 8 + n])


def test_single_shard(tmp_path: Path) -> None:
    mixed = _mixed()
    (shard,) = _write(tmp_path, mixed, 1 << 20, hf_index=True)
    assert shard.path == tmp_path / "model.safetensors"
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert shard.sha256 == hashlib.sha256(shard.path.read_bytes()).hexdigest()
    assert shard.size == shard.path.stat().st_size
    assert shard.tensors == sorted(mixed)
    loaded = load_file(str(shard.path))
    assert loaded.keys() == mixed.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in mixed.items())
    with safe_open(str(shard.path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(mixed)
        for k, v in mixed.items():
            assert torch.equal(f.get_tensor(k), v)
            assert f.get_slice(k).get_shape() == list(v.shape)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_byte_layout(tmp_path: Path) -> None:
    """Header padded to 8 bytes; tensors tile the data region, aligned to their element size."""
    mixed = _mixed()
    (shard,) = _write(tmp_path, mixed, 1 << 20)
    n, header = _header(shard.path)
    raw = shard.path.read_bytes()[8 : 8 + n]
    assert n % 8 == 0 and raw.rstrip(b" ").endswith(b"}") and len(raw.rstrip(b" ")) > n - 8
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = sorted((info["data_offsets"], name) for name, info in header.items())
    cursor = 0
    for (begin, end), name in spans:
        assert begin == cursor
        assert (8 + n + begin) % mixed[name].element_size() == 0  # aligned
        assert end - begin == mixed[name].numel() * mixed[name].element_size()
        cursor = end
    assert 8 + n + cursor == shard.size
    # largest elements first, then by name: the order safetensors' own writer uses
    assert [name for _, name in spans] == ["i", "e", "f", "s", "b", "h", "flag"]


def test_known_bytes(tmp_path: Path) -> None:
    """The format is part of content addresses: pin it (the bytes the buffering writer made)."""
    (shard,) = _write(tmp_path, _mixed(), 1 << 20)
    assert shard.sha256 == "df3edbe39d773883790762d23f419e6d454cfb968b1d72f2e12fb17a44dc8267"


def test_sharding_and_index(tmp_path: Path) -> None:
    shards = _write(tmp_path, _tensors(), 40_000, hf_index=True)
    assert [s.path.name for s in shards] == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert [s.tensors for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    assert index["weight_map"] == {
        f"t{i}": f"model-0000{i // 2 + 1}-of-00003.safetensors" for i in range(5)
    }
    for s in shards:
        assert s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
        assert s.size == s.path.stat().st_size
        assert sorted(load_file(str(s.path))) == s.tensors
    with CheckpointReader.open(tmp_path) as r:  # HF layout readable by our own reader
        assert torch.equal(r.get("t3"), _tensors()["t3"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shards_split_by_size_in_plan_order(tmp_path: Path) -> None:
    sizes = {"z": 7_500, "a": 2_500, "m": 2_500, "huge": 12_500, "c": 1_250}  # float32 counts
    tensors = {k: torch.full((n,), float(i)) for i, (k, n) in enumerate(sizes.items())}
    w = ShardWriter(tmp_path, max_shard_bytes=40_000, plan=_plan(tensors))
    # plan order decides the shards (z+a = 40 000 fit; m starts a new one; huge alone)
    # within a shard, the canonical order: same element size, so by name
    assert w.order == ["a", "z", "m", "huge", "c"]
    for name in w.order:
        w.add(name, tensors[name])
    shards = w.finish()
    assert [s.tensors for s in shards] == [["a", "z"], ["m"], ["huge"], ["c"]]
    for s in shards:
        payload = sum(tensors[n].numel() * 4 for n in s.tensors)
        assert payload <= 40_000 or len(s.tensors) == 1
        assert all(torch.equal(v, tensors[k]) for k, v in load_file(str(s.path)).items())


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"small": torch.zeros(2), "big": torch.zeros(1000), "small2": torch.zeros(2)}
    shards = _write(tmp_path, tensors, 100)
    assert [s.tensors for s in shards] == [["small"], ["big"], ["small2"]]


def test_bytes_are_canonical(tmp_path: Path) -> None:
    shas = []
    for run, order in enumerate([sorted(_tensors()), sorted(_tensors(), reverse=True)]):
        tensors = {k: _tensors()[k] for k in order}
        shas.append(_write(tmp_path / str(run), tensors, 1 << 20)[0].sha256)
    assert shas[0] == shas[1]


def test_out_of_order_add_is_refused(tmp_path: Path) -> None:
    tensors = _tensors()
    w = ShardWriter(tmp_path, max_shard_bytes=40_000, plan=_plan(tensors))
    with pytest.raises(ValueError, match="'t1' early: expected 't0' next"):
        w.add("t1", tensors["t1"])
    with pytest.raises(ValueError, match="'nope' not planned"):
        w.add("nope", tensors["t0"])
    assert not any(tmp_path.iterdir())  # a refused add writes nothing
    w.add("t0", tensors["t0"])
    with pytest.raises(ValueError, match="'t0' added twice"):
        w.add("t0", tensors["t0"])
    for name in w.order[1:]:  # a refusal does not spoil the writer
        w.add(name, tensors[name])
    with pytest.raises(ValueError, match="all planned tensors were added"):
        w.add("extra", torch.zeros(1))
    shards = w.finish(hf_index=True)
    with CheckpointReader.open(tmp_path) as r:
        assert all(torch.equal(r.get(k), v) for k, v in tensors.items())
    assert len(shards) == 3


@pytest.mark.parametrize(
    ("tensor", "why"),
    [
        (torch.zeros(64, 65), r"got torch.float32\[64, 65\], planned torch.float32\[64, 64\]"),
        (torch.zeros(4096), r"got torch.float32\[4096\]"),
        (torch.zeros(64, 64, dtype=torch.float64), "got torch.float64"),
        (torch.zeros(64, 64, dtype=torch.bfloat16), "got torch.bfloat16"),
    ],
)
def test_wrong_shape_or_dtype_is_refused(tmp_path: Path, tensor: torch.Tensor, why: str) -> None:
    w = ShardWriter(tmp_path, max_shard_bytes=1 << 20, plan=_plan(_tensors()))
    with pytest.raises(ValueError, match=why):
        w.add("t0", tensor)
    assert not any(tmp_path.iterdir())
    w.abort()


def test_bad_plans_are_refused(tmp_path: Path) -> None:
    spec = TensorSpec("a", torch.float32, (2,))
    with pytest.raises(ValueError, match="planned twice"):
        ShardWriter(tmp_path, max_shard_bytes=100, plan=[spec, spec])
    with pytest.raises(TypeError, match="cannot be stored"):
        ShardWriter(tmp_path, max_shard_bytes=100, plan=[TensorSpec("c", torch.complex64, (2,))])
    with pytest.raises(ValueError, match="positive"):
        ShardWriter(tmp_path, max_shard_bytes=0, plan=[spec])


def test_finish_with_missing_tensors_fails_and_cleans_up(tmp_path: Path) -> None:
    tensors = _tensors()
    w = ShardWriter(tmp_path, max_shard_bytes=20_000, plan=_plan(tensors))
    for name in w.order[:3]:
        w.add(name, tensors[name])
    assert w.remaining == 2
    assert any(tmp_path.iterdir())  # completed and in-progress temp shards
    with pytest.raises(ValueError, match="2 planned tensors were never added"):
        w.finish()
    assert not any(tmp_path.iterdir())


def test_abort_and_errors(tmp_path: Path) -> None:
    tensors = _tensors()
    w = ShardWriter(tmp_path, max_shard_bytes=20_000, plan=_plan(tensors))
    for name in w.order[:3]:
        w.add(name, tensors[name])
    assert any(tmp_path.iterdir())
    w.abort()
    assert not any(tmp_path.iterdir())
    with pytest.raises(RuntimeError):
        w.add("t3", tensors["t3"])
    assert ShardWriter(tmp_path, max_shard_bytes=10, plan=[]).finish() == []
    # leaving the context without finishing (with or without an error) cleans up
    with ShardWriter(tmp_path, max_shard_bytes=20_000, plan=_plan(tensors)) as w2:
        w2.add(w2.order[0], tensors[w2.order[0]])
    assert not any(tmp_path.iterdir())


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    big = torch.randn(1000, 10)
    tensors = {"row": big[3], "col": big[:, 2], "t": big[:4].t()}
    (shard,) = _write(tmp_path, tensors, 1 << 20)
    loaded = load_file(str(shard.path))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert shard.size == shard.path.stat().st_size
