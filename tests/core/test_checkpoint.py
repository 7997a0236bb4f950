"""Checkpoint reading: layouts, side files, digests, and refusals before any tensor is read."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from randes.checkpoint import CheckpointReader, TensorMeta, read_header
from randes.digests import source_digest
from randes.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from tests.core.helpers import load_all, save

TENSORS = {
    "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
    "b": torch.tensor([1, 2], dtype=torch.int64),
    "c": torch.ones(3, dtype=torch.bfloat16),
}


def _raw(header: dict[str, object], data: bytes, *, length: int | None = None) -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob) if length is None else length) + blob + data


def _one_line(exc: BaseException, needle: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and needle in msg


def test_single_file_dir_and_metas(tmp_path: Path) -> None:
    save(tmp_path / "m" / "model.safetensors", TENSORS)
    (tmp_path / "m" / "config.json").write_text("{}")
    with CheckpointReader.open(tmp_path / "m") as r:
        assert r.keys() == ["a", "b", "c"]
        assert r.meta("a") == TensorMeta(torch.float32, (2, 3))
        assert "b" in r and "z" not in r
        assert set(r.side_files) == {"config.json"}
        got = load_all(r)
    for k, v in TENSORS.items():
        assert torch.equal(got[k], v)
    # the file itself, with a HF name: side files next to it count
    assert CheckpointReader.open(tmp_path / "m" / "model.safetensors").side_files
    # an arbitrary file name: no side files picked up from its directory
    other = save(tmp_path / "m" / "other.safetensors", TENSORS)
    assert CheckpointReader.open(other).side_files == {}


def test_hf_sharded_with_and_without_index(tmp_path: Path) -> None:
    d = tmp_path / "sharded"
    save(d / "model-00001-of-00002.safetensors", {"a": TENSORS["a"]})
    save(d / "model-00002-of-00002.safetensors", {"b": TENSORS["b"], "c": TENSORS["c"]})
    with CheckpointReader.open(d) as r:  # no index: a complete shard set is enough
        assert r.keys() == ["a", "b", "c"]
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with CheckpointReader.open(d) as r:
        assert torch.equal(r.get("c"), TENSORS["c"])
        assert len(r.files) == 2

    index["weight_map"]["c"] = "model-00001-of-00002.safetensors"  # type: ignore[index]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError):
        CheckpointReader.open(d)
    index["weight_map"]["c"] = "../evil.safetensors"  # type: ignore[index]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="bad shard name"):
        CheckpointReader.open(d)


def test_incomplete_shards_refused(tmp_path: Path) -> None:
    save(tmp_path / "model-00001-of-00003.safetensors", {"a": TENSORS["a"]})
    save(tmp_path / "model-00003-of-00003.safetensors", {"b": TENSORS["b"]})
    with pytest.raises(CheckpointError, match="incomplete"):
        CheckpointReader.open(tmp_path)


def test_source_digest_is_content_addressed(tmp_path: Path) -> None:
    a = save(tmp_path / "a" / "model.safetensors", TENSORS)
    (tmp_path / "a" / "config.json").write_text('{"x": 1}')
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    da = source_digest(CheckpointReader.open(tmp_path / "a"))
    assert da == source_digest(CheckpointReader.open(tmp_path / "b"))
    assert len(da) == 64
    (tmp_path / "b" / "config.json").write_text('{"x": 2}')
    assert source_digest(CheckpointReader.open(tmp_path / "b")) != da
    assert source_digest(CheckpointReader.open(a)) == da  # HF file name: same side files


def _marker_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    path.write_bytes(pickle.dumps(Evil()))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt", ".pkl"])
def test_pickle_file_refused_never_loaded(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / f"pytorch_model{suffix}"
    _marker_pickle(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        CheckpointReader.open(ckpt)
    _one_line(info.value, str(ckpt))
    with pytest.raises(UnsafeCheckpointError):
        CheckpointReader.from_files([ckpt])
    assert not marker.exists()


def test_pickle_only_dir_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "model"
    d.mkdir()
    _marker_pickle(d / "pytorch_model.bin", marker)
    (d / "config.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError):
        CheckpointReader.open(d)
    assert not marker.exists()


def test_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointReader.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no safetensors"):
        CheckpointReader.open(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a .safetensors"):
        CheckpointReader.open(tmp_path / "x.txt")


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("blob", "why"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 2**62) + b"{}", "absurd"),
        (struct.pack("<Q", 200 * 1024 * 1024) + b"{}" + b"\0" * 16, "absurd"),
        (_raw({}, b"", length=100), "absurd"),
        (struct.pack("<Q", 5) + b"{nope", "malformed JSON"),
        (struct.pack("<Q", 4) + b"\xff\xfe{}", "malformed JSON"),
        (_raw([], b""), "not a JSON object"),  # type: ignore[arg-type]
        (_raw({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "expected dtype"),
        (_raw({"a": {**F32_2, "dtype": "Q9"}}, b"\0" * 8), "unsupported dtype"),
        (_raw({"a": {**F32_2, "shape": [-2]}}, b"\0" * 8), "shape"),
        (_raw({"a": {**F32_2, "shape": [True]}}, b"\0" * 8), "shape"),
        (_raw({"a": {**F32_2, "data_offsets": [0, 80]}}, b"\0" * 8), "outside"),
        (_raw({"a": {**F32_2, "data_offsets": [0, 4]}}, b"\0" * 4), "expected"),
        (_raw({"a": F32_2, "b": F32_2}, b"\0" * 16), "overlaps"),
        (_raw({"a": {**F32_2, "data_offsets": [8, 16]}}, b"\0" * 16), "gap"),
        (_raw({"a": F32_2}, b"\0" * 12), "cover"),
        (_raw({"__metadata__": {"k": 1}, "a": F32_2}, b"\0" * 8), "__metadata__"),
        (struct.pack("<Q", 2) + b"{}" + b'{"a":1,"a":2}', "cover"),
    ],
)
def test_corrupt_headers_refused(tmp_path: Path, blob: bytes, why: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CorruptCheckpointError) as info:
        CheckpointReader.open(path)
    _one_line(info.value, str(path))
    assert why in str(info.value)


def test_duplicate_json_keys_refused(tmp_path: Path) -> None:
    entry = b'{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    blob = b'{"a":' + entry + b',"a":' + entry + b"}"
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="duplicate"):
        read_header(path)


def test_real_files_pass_validation(tmp_path: Path) -> None:
    many = {
        f"t{i}": torch.randn(i + 1, 3).to(dt)
        for i, dt in enumerate([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    }
    many["i8"] = torch.ones(5, dtype=torch.int8)
    many["flag"] = torch.tensor([True, False])
    many["scalar"] = torch.tensor(3.0)
    many["empty"] = torch.zeros(0, 4)
    path = tmp_path / "ok.safetensors"
    save_file(many, str(path))
    metas = read_header(path)
    assert {k: (m.dtype, m.shape) for k, m in metas.items()} == {
        k: (v.dtype, tuple(v.shape)) for k, v in many.items()
    }
    with CheckpointReader.open(path) as r:
        assert all(torch.equal(r.get(k), v) for k, v in many.items())


def test_duplicate_tensor_across_shards_refused(tmp_path: Path) -> None:
    a = save(tmp_path / "x.safetensors", {"a": TENSORS["a"]})
    b = save(tmp_path / "y.safetensors", {"a": TENSORS["a"]})
    with pytest.raises(CorruptCheckpointError, match="also in"):
        CheckpointReader.from_files([a, b])


def test_get_returns_a_tensor_the_caller_owns(tmp_path: Path) -> None:
    with CheckpointReader.open(save(tmp_path / "m.safetensors", TENSORS)) as r:
        r.get("a").add_(100)
        assert torch.equal(r.get("a"), TENSORS["a"])
