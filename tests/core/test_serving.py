"""The serving copy written by fold / unfold and read back as a master superposition."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from randes.checkpoint import CheckpointReader, TensorMeta
from randes.config import DEFAULT_SERVING, TransformConfig
from randes.errors import IncompatibleCheckpointError
from randes.fold import FoldResult, fold, unfold
from randes.layout import layout_of, superposition_metas
from randes.manifest import (
    BaseRef,
    BundleManifest,
    ServingArtifact,
    ShardRef,
    dump_manifest,
    load_bundle_manifest,
)
from randes.quantize import QuantScheme, fake_quantize, quantize
from randes.retrieve import retrieve
from randes.serving import SERVING_DIR, QuantizedReader, ServingWriter
from randes.transforms import TaskTransform
from tests.core.helpers import finetune, gpt2_like, open_dict, save

SCHEMES = [
    QuantScheme(bits=4, group_size=64),
    QuantScheme(bits=8, group_size=None),
    QuantScheme(bits=3, group_size=24),
]


def _reader(shards: list) -> CheckpointReader:  # type: ignore[type-arg]
    return CheckpointReader.from_files([s.path for s in shards])


def _served(base: CheckpointReader, result: FoldResult, config: TransformConfig) -> QuantizedReader:
    assert config.serving is not None
    metas = superposition_metas(base, config)
    return QuantizedReader(_reader(result.serving), config.serving, metas)


@pytest.fixture
def world(tmp_path: Path) -> tuple[CheckpointReader, list[CheckpointReader]]:
    base_model = gpt2_like(n_layer=3, d=16)
    base = open_dict(tmp_path / "base.safetensors", base_model)
    tuned = [
        open_dict(tmp_path / f"ft{i}" / "model.safetensors", finetune(base_model, seed=i))
        for i in range(3)
    ]
    return base, tuned


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_fold_writes_the_quantized_master_exactly(
    tmp_path: Path, world, scheme: QuantScheme, dtype: str
) -> None:
    base, tuned = world
    config = TransformConfig(serving=scheme, dtype=dtype)  # type: ignore[arg-type]
    parent = None
    for i, checkpoint in enumerate(tuned):
        result = fold(
            base=base,
            checkpoint=checkpoint,
            parent=parent,
            seed=100 + i,
            config=config,
            out_dir=tmp_path / f"v{i + 1}",
        )
        assert result.serving and all(s.path.parent.name == SERVING_DIR for s in result.serving)
        master = _reader(result.superposition)
        served = _served(base, result, config)
        assert served.keys() == master.keys() and served.metas() == master.metas()
        for slot in master:
            # derived from this version's master, never from the parent's serving copy
            want = fake_quantize(master.get(slot), scheme).to(master.meta(slot).dtype)
            assert torch.equal(served.get(slot), want), slot
        parent = master


def test_remove_rederives_the_serving_copy_from_the_master(tmp_path: Path, world) -> None:
    base, tuned = world
    config = TransformConfig()
    assert config.serving == QuantScheme(bits=4, group_size=64)  # the default
    v1 = fold(
        base=base, checkpoint=tuned[0], parent=None, seed=1, config=config, out_dir=tmp_path / "1"
    )
    task_2: dict[str, Any] = {"base": base, "checkpoint": tuned[1], "seed": 2, "config": config}
    v2 = fold(**task_2, parent=_reader(v1.superposition), out_dir=tmp_path / "2")
    v3 = unfold(**task_2, parent=_reader(v2.superposition), out_dir=tmp_path / "3")  # out again
    master, served = _reader(v3.superposition), _served(base, v3, config)
    for slot in master:
        assert torch.equal(served.get(slot), fake_quantize(master.get(slot), config.serving))


def test_no_serving_format_writes_nothing_more(tmp_path: Path, world) -> None:
    base, tuned = world
    config = TransformConfig(serving=None)
    result = fold(
        base=base, checkpoint=tuned[0], parent=None, seed=5, config=config, out_dir=tmp_path / "v"
    )
    assert result.serving == [] and not (tmp_path / "v" / SERVING_DIR).exists()
    with_serving = fold(
        base=base,
        checkpoint=tuned[0],
        parent=None,
        seed=5,
        config=TransformConfig(),
        out_dir=tmp_path / "w",
    )
    # the master is the same bytes either way
    assert [s.sha256 for s in result.superposition] == [
        s.sha256 for s in with_serving.superposition
    ]


def test_retrieval_from_the_serving_copy_is_within_the_quantization_bound(
    tmp_path: Path, world
) -> None:
    base, tuned = world
    config = TransformConfig(serving=QuantScheme(bits=4, group_size=32))
    result = fold(
        base=base, checkpoint=tuned[0], parent=None, seed=9, config=config, out_dir=tmp_path / "v"
    )
    served, master = _served(base, result, config), _reader(result.superposition)
    common = {
        "base": base,
        "private": _reader(result.private),
        "seed": 9,
        "key_map": result.key_map,
        "config": config,
        "scale": 0.7,
    }
    exact = dict(retrieve(superposition=master, **common))  # type: ignore[arg-type]
    got = dict(retrieve(superposition=served, **common))  # type: ignore[arg-type]
    assert got.keys() == exact.keys()
    codes = _reader(result.serving)
    transform = TaskTransform(layout_of(base, config), 9)
    changed = 0
    for name, tensor in exact.items():
        if name in master:  # superposed: lambda * (sign flips of) the rounding of its slot
            step = float(codes.get(transform.slot_of(name) + ".scale").max())
            bound = 0.7 * step / 2 * (1 + 1e-5) + 1e-6 * float(tensor.abs().max())
            assert float((got[name] - tensor).abs().max()) <= bound, name
            changed += not torch.equal(got[name], tensor)
        else:  # private tensors, buffers: untouched
            assert torch.equal(got[name], tensor), name
    assert changed


def test_reader_refuses_a_copy_that_does_not_fit(tmp_path: Path, world) -> None:
    base, tuned = world
    config = TransformConfig()
    result = fold(
        base=base, checkpoint=tuned[0], parent=None, seed=3, config=config, out_dir=tmp_path / "v"
    )
    metas = superposition_metas(base, config)
    # another scheme than the one written: the sizes tell
    with pytest.raises(IncompatibleCheckpointError, match=r"needs torch.uint8\[") as info:
        QuantizedReader(_reader(result.serving), QuantScheme(bits=8, group_size=64), metas)
    assert "\n" not in str(info.value)
    # a slot missing from the copy, or one the base does not have
    metas_extra = {**metas, "extra.weight": TensorMeta(torch.float32, (4, 4))}
    with pytest.raises(IncompatibleCheckpointError, match="names differ"):
        QuantizedReader(_reader(result.serving), config.serving, metas_extra)  # type: ignore[arg-type]
    # codes of the right names but the wrong length
    slot = sorted(metas)[0]
    inner = _reader(result.serving)
    tensors = {n: inner.get(n) for n in inner.keys()}  # noqa: SIM118
    tensors[slot + ".q"] = torch.cat([tensors[slot + ".q"], torch.zeros(1, dtype=torch.uint8)])
    bad = CheckpointReader.from_files([save(tmp_path / "bad" / "x.safetensors", tensors)])
    with pytest.raises(IncompatibleCheckpointError, match=slot):
        QuantizedReader(bad, config.serving, metas)  # type: ignore[arg-type]


def test_writer_reorders_names_the_shards_sort_differently(tmp_path: Path) -> None:
    """``a`` < ``a.b`` but ``a.q`` > ``a.b.q``: slots come in the master's order, the
    codes writer wants its own; several small shards on top."""
    scheme = QuantScheme(bits=4, group_size=8)
    gen = torch.Generator().manual_seed(0)
    values = {n: torch.randn(64, generator=gen) for n in ["a", "a.b", "a_c", "ab", "a.b.c"]}
    order = sorted(values)
    writer = ServingWriter(
        tmp_path,
        scheme=scheme,
        slots=[(n, (64,)) for n in order],
        max_shard_bytes=80,
    )
    for name in order:
        writer.add(name, values[name])
    shards = writer.finish()
    assert len(shards) > 2
    reader = CheckpointReader.from_files([s.path for s in shards])
    for name, value in values.items():
        q = quantize(value, scheme)
        assert torch.equal(reader.get(name + ".q"), q.codes)
        assert torch.equal(reader.get(name + ".scale"), q.scales)


def test_manifests_and_configs_written_before_serving_copies_still_load() -> None:
    """Old manifests (no ``serving``, a transform without it) and old registry rows load:
    the version serves its master, the bundle gets the default format for new folds."""
    sha = "ab" * 32
    ref = ShardRef(key=f"objects/ab/{sha}", sha256=sha, size=10, tensors=["w"])
    manifest = BundleManifest(
        bundle="b",
        version=1,
        created_at="2024-01-01T00:00:00+00:00",
        base=BaseRef(
            name="t", uri="file:///t", sha256=sha, manifest_key="m/x", manifest_sha256=sha
        ),
        transform=TransformConfig(),
        superposition=[ref],
        serving=ServingArtifact(scheme=QuantScheme(bits=4, group_size=64), shards=[ref]),
    )
    assert list(manifest.shards()) == [ref, ref]  # gc and integrity checks see both
    old = json.loads(dump_manifest(manifest))
    del old["serving"], old["transform"]["serving"]
    loaded = load_bundle_manifest(json.dumps(old).encode())
    assert loaded.serving is None and list(loaded.shards()) == [ref]
    assert loaded.transform.serving == DEFAULT_SERVING
    assert TransformConfig.model_validate({"rank1": "flip"}).serving == DEFAULT_SERVING
