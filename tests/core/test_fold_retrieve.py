"""fold / unfold / retrieve / materialize on a small GPT-2-shaped model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from randes.checkpoint import CheckpointReader
from randes.config import MAPS, MapName, TransformConfig
from randes.errors import IncompatibleCheckpointError, NonFiniteTensorError, RandesError
from randes.fold import FoldResult, fold, unfold
from randes.layout import layout_of, superposed_names
from randes.manifest import KeyMap
from randes.materialize import materialize
from randes.retrieve import retrieve
from randes.transforms import TaskTransform
from tests.core.helpers import finetune, gpt2_like, open_dict, save

POLICIES = ["flip", "plain", "private"]
PREFIXES = ["", "transformer."]


def _reader(shards: list) -> CheckpointReader | None:  # type: ignore[type-arg]
    return CheckpointReader.from_files([s.path for s in shards]) if shards else None


def _retrieved(
    base: CheckpointReader,
    result: FoldResult,
    superposition: CheckpointReader | None,
    seed: int,
    config: TransformConfig,
    scale: float | Mapping[str, float] = 1.0,
) -> dict[str, torch.Tensor]:
    out = dict(
        retrieve(
            base=base,
            superposition=superposition,
            private=_reader(result.private),
            seed=seed,
            key_map=result.key_map,
            config=config,
            scale=scale,
        )
    )
    return out


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.fixture
def base_model() -> dict[str, torch.Tensor]:
    return gpt2_like(n_layer=3, d=8)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prefix", PREFIXES)
def test_single_task_roundtrip_fp32(
    tmp_path: Path, base_model: dict[str, torch.Tensor], policy: str, prefix: str
) -> None:
    config = TransformConfig(rank1=policy)  # type: ignore[arg-type]
    tuned = finetune(base_model, seed=1, prefix=prefix)
    tuned[prefix + "position_ids"] = tuned[prefix + "position_ids"].flip(-1)  # differs: private
    base = open_dict(tmp_path / "base.safetensors", base_model)
    ckpt = open_dict(tmp_path / "ft" / "model.safetensors", tuned)
    result = fold(
        base=base, checkpoint=ckpt, parent=None, seed=77, config=config, out_dir=tmp_path / "v1"
    )
    assert result.key_map == KeyMap(checkpoint_prefix=prefix)
    sup = _reader(result.superposition)
    assert sup is not None and sup.keys() == superposed_names(base, config)
    private_names = {n for s in result.private for n in s.tensors}
    assert {"score.weight", "score.bias", prefix + "position_ids"} <= private_names
    if policy == "private":
        assert prefix + "h.1.ln_1.bias" in private_names
        assert "h.1.ln_1.bias" not in sup
    else:
        assert "h.1.ln_1.bias" in sup

    out = _retrieved(base, result, sup, 77, config)
    assert list(out) == [*sorted(prefix + n for n in base_model), "score.bias", "score.weight"]
    for name, expected in tuned.items():
        assert out[name].dtype == expected.dtype and out[name].shape == expected.shape
        if name in private_names or not expected.is_floating_point():
            assert torch.equal(out[name], expected), name  # bit-exact
        else:
            assert _max_rel(out[name], expected) < 1e-5, name
    # the norms recorded are the deltas' norms
    delta = tuned[prefix + "wte.weight"] - base_model["wte.weight"]
    assert result.delta_norms["wte.weight"] == pytest.approx(float(delta.double().norm()), rel=1e-6)
    assert set(result.delta_norms) == {n for n in base_model if n != "position_ids"}
    # the superposition really is scrambled, not the plain delta
    slot = sup.get("h.1.mlp.c_fc.weight")
    plain = tuned[prefix + "h.1.mlp.c_fc.weight"] - base_model["h.1.mlp.c_fc.weight"]
    assert not torch.allclose(slot, plain)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_superposition_roundtrip(
    tmp_path: Path, base_model: dict[str, torch.Tensor], dtype: str
) -> None:
    config = TransformConfig(rank1="flip", dtype=dtype)  # type: ignore[arg-type]
    tuned = finetune(base_model, seed=2, head=False)
    base = open_dict(tmp_path / "b.safetensors", base_model)
    ckpt = open_dict(tmp_path / "c.safetensors", tuned)
    result = fold(
        base=base, checkpoint=ckpt, parent=None, seed=5, config=config, out_dir=tmp_path / "o"
    )
    sup = _reader(result.superposition)
    assert sup is not None
    assert {sup.meta(n).dtype for n in sup} == {getattr(torch, dtype)}
    unit = 2.0**-8 if dtype == "bfloat16" else 2.0**-11  # relative rounding of the format
    out = _retrieved(base, result, sup, 5, config)
    for name, expected in tuned.items():
        if not expected.is_floating_point():
            assert torch.equal(out[name], expected)
            continue
        delta = (expected - base_model[name]).abs()
        err = (out[name] - expected).abs()
        assert bool((err <= unit * delta + 1e-6 * expected.abs() + 1e-7).all()), name


def test_bf16_base_model(tmp_path: Path) -> None:
    base_model = {
        k: v.bfloat16() if v.is_floating_point() else v
        for k, v in gpt2_like(n_layer=2, d=4).items()
    }
    tuned = finetune(base_model, seed=3, step=0.25)
    base = open_dict(tmp_path / "b.safetensors", base_model)
    ckpt = open_dict(tmp_path / "c.safetensors", tuned)
    config = TransformConfig()
    result = fold(base=base, checkpoint=ckpt, parent=None, seed=9, config=config, out_dir=tmp_path)
    out = _retrieved(base, result, _reader(result.superposition), 9, config)
    for name, expected in tuned.items():
        assert out[name].dtype == expected.dtype
        assert torch.equal(out[name], expected), name  # deltas of bf16 values are exact in fp32


def _fold_n(
    tmp_path: Path,
    base: CheckpointReader,
    base_model: dict[str, torch.Tensor],
    config: TransformConfig,
    seeds: list[int],
) -> tuple[list[FoldResult], list[dict]]:  # type: ignore[type-arg]
    results: list[FoldResult] = []
    tuned_all = []
    parent = None
    for i, seed in enumerate(seeds):
        tuned = finetune(base_model, seed=10 + i)
        tuned_all.append(tuned)
        ckpt = open_dict(tmp_path / f"ft{i}.safetensors", tuned)
        results.append(
            fold(
                base=base,
                checkpoint=ckpt,
                parent=parent,
                seed=seed,
                config=config,
                out_dir=tmp_path / f"v{i + 1}",
            )
        )
        parent = _reader(results[-1].superposition)
    return results, tuned_all


@pytest.mark.parametrize("kind", MAPS)
@pytest.mark.parametrize("policy", POLICIES)
def test_two_tasks_cross_talk_is_exactly_the_scrambled_other_delta(
    tmp_path: Path, base_model: dict[str, torch.Tensor], policy: str, kind: MapName
) -> None:
    config = TransformConfig(rank1=policy, map=kind)  # type: ignore[arg-type]
    base = open_dict(tmp_path / "b.safetensors", base_model)
    seeds = [101, 202]
    results, tuned = _fold_n(tmp_path, base, base_model, config, seeds)
    sup = _reader(results[-1].superposition)
    assert sup is not None
    layout = layout_of(base, config)
    deltas = [{n: t[n].float() - base_model[n].float() for n in layout.superposed} for t in tuned]
    transforms = [TaskTransform(layout, s) for s in seeds]
    for t, u in [(0, 1), (1, 0)]:
        out = _retrieved(base, results[t], sup, seeds[t], config)
        cross = transforms[t].unscramble(transforms[u].scramble(deltas[u]))
        for name in layout.superposed:
            expected = base_model[name].float() + (deltas[t][name] + cross[name])
            assert torch.equal(out[name], expected), name
            if name in layout.flipped:  # decorrelated, not aligned (plain rank-1: aligned)
                assert not torch.allclose(cross[name], deltas[u][name])
        for name in layout.private_base:
            assert torch.equal(out[name], tuned[t][name])
        assert torch.equal(out["score.weight"], tuned[t]["score.weight"])


def test_unfold_returns_parent(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    config = TransformConfig(rank1="flip")
    base = open_dict(tmp_path / "b.safetensors", base_model)
    results, tuned = _fold_n(tmp_path, base, base_model, config, [1, 2, 3])
    v3 = _reader(results[2].superposition)
    assert v3 is not None
    removed = unfold(
        base=base,
        checkpoint=open_dict(tmp_path / "ft2.safetensors", tuned[2]),
        parent=v3,
        seed=3,
        config=config,
        out_dir=tmp_path / "v4",
    )
    assert removed.private == [] and not (tmp_path / "v4" / "private").exists()
    back, v2 = _reader(removed.superposition), _reader(results[1].superposition)
    assert back is not None and v2 is not None
    for name in v2:
        assert torch.allclose(back.get(name), v2.get(name), rtol=1e-5, atol=1e-6), name
    # removing the first task instead leaves tasks 2 and 3 retrievable as before
    minus1 = unfold(
        base=base,
        checkpoint=open_dict(tmp_path / "ft0.safetensors", tuned[0]),
        parent=v3,
        seed=1,
        config=config,
        out_dir=tmp_path / "v5",
    )
    solo = _reader(minus1.superposition)
    with_all = _retrieved(base, results[1], v3, 2, config)
    without = _retrieved(base, results[1], solo, 2, config)
    err_all = sum(
        float((with_all[n] - tuned[1][n]).norm()) for n in base_model if n != "position_ids"
    )
    err_without = sum(
        float((without[n] - tuned[1][n]).norm()) for n in base_model if n != "position_ids"
    )
    assert err_without < err_all


def test_unfold_of_a_reconciled_checkpoint_is_exact(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    """DDP-wrapped, bf16, missing a tensor: fold then unfold gives the parent back."""
    config = TransformConfig()
    base = open_dict(tmp_path / "b.safetensors", base_model)
    first = finetune(base_model, seed=1)
    one = fold(
        base=base,
        checkpoint=open_dict(tmp_path / "f1.safetensors", first),
        parent=None,
        seed=11,
        config=config,
        out_dir=tmp_path / "v1",
    )
    messy = {
        f"module.transformer.{k}": v.bfloat16() if v.is_floating_point() else v
        for k, v in finetune(base_model, seed=2).items()
        if k != "h.1.mlp.c_fc.weight"
    }
    ckpt = open_dict(tmp_path / "f2.safetensors", messy)
    parent = _reader(one.superposition)
    two = fold(
        base=base, checkpoint=ckpt, parent=parent, seed=22, config=config, out_dir=tmp_path / "v2"
    )
    assert two.key_map.wrappers == ("module.",) and two.key_map.checkpoint_prefix == "transformer."
    assert two.key_map.absent == ("h.1.mlp.c_fc.weight",)
    back = unfold(
        base=base,
        checkpoint=ckpt,
        parent=_reader(two.superposition),  # type: ignore[arg-type]
        seed=22,
        config=config,
        out_dir=tmp_path / "v3",
    )
    restored, original = _reader(back.superposition), _reader(one.superposition)
    assert restored is not None and original is not None
    for name in original:
        assert torch.allclose(restored.get(name), original.get(name), atol=1e-6), name


class CountingReader(CheckpointReader):
    """A reader that counts tensor reads (a structural cost measure)."""

    reads: dict[str, int]

    def get(self, name: str) -> torch.Tensor:
        self.reads = getattr(self, "reads", {})
        self.reads[name] = self.reads.get(name, 0) + 1
        return super().get(name)


def test_fold_reads_each_input_tensor_once_whatever_the_task_count(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    config = TransformConfig(rank1="flip")
    plain_base = open_dict(tmp_path / "b.safetensors", base_model)
    results, _ = _fold_n(tmp_path, plain_base, base_model, config, [1, 2, 3, 4, 5])
    new = finetune(base_model, seed=99)
    save(tmp_path / "new.safetensors", new)
    per_parent: list[tuple[dict[str, int], ...]] = []
    for parent_result in (results[0], results[4]):  # 1 task vs 5 tasks in the parent
        base = CountingReader.open(tmp_path / "b.safetensors")
        ckpt = CountingReader.open(tmp_path / "new.safetensors")
        parent = CountingReader.from_files([s.path for s in parent_result.superposition])
        out = tmp_path / f"n{len(per_parent)}"
        fold(base=base, checkpoint=ckpt, parent=parent, seed=6, config=config, out_dir=out)
        assert base.reads == dict.fromkeys(set(base_model) - {"position_ids"} | {"position_ids"}, 1)
        assert ckpt.reads == dict.fromkeys(new, 1)
        assert parent.reads == dict.fromkeys(parent.keys(), 1)
        per_parent.append((base.reads, ckpt.reads, parent.reads))
    assert per_parent[0] == per_parent[1]


def test_retrieve_reads_base_and_superposition_once(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    config = TransformConfig()
    plain_base = open_dict(tmp_path / "b.safetensors", base_model)
    results, _ = _fold_n(tmp_path, plain_base, base_model, config, [1, 2])
    base = CountingReader.open(tmp_path / "b.safetensors")
    sup = CountingReader.from_files([s.path for s in results[1].superposition])
    _retrieved(base, results[0], sup, 1, config, scale=0.5)
    assert set(sup.reads.values()) == {1} and set(sup.reads) == set(sup.keys())
    assert set(base.reads.values()) == {1}


def test_scale_and_per_tensor_scale(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    config = TransformConfig(rank1="plain", sign_flip=False, layer_shuffle=False)
    tuned = finetune(base_model, seed=4, head=False)
    base = open_dict(tmp_path / "b.safetensors", base_model)
    result = fold(
        base=base,
        checkpoint=open_dict(tmp_path / "c.safetensors", tuned),
        parent=None,
        seed=1,
        config=config,
        out_dir=tmp_path / "o",
    )
    sup = _reader(result.superposition)
    half = _retrieved(base, result, sup, 1, config, scale=0.5)
    expected = base_model["wte.weight"] + 0.5 * (tuned["wte.weight"] - base_model["wte.weight"])
    assert torch.allclose(half["wte.weight"], expected, atol=1e-6)
    assert not result.private  # rank-1 tensors superposed: nothing stored per task
    per = _retrieved(base, result, sup, 1, config, scale={"wte.weight": 0.0, "*": 1.0})
    assert torch.equal(per["wte.weight"], base_model["wte.weight"])
    assert torch.allclose(per["wpe.weight"], tuned["wpe.weight"], atol=1e-6)
    with pytest.raises(ValueError, match="no scale"):
        _retrieved(base, result, sup, 1, config, scale={"wte.weight": 1.0})
    empty = dict(
        retrieve(
            base=base,
            superposition=None,
            private=None,
            seed=1,
            key_map=KeyMap(),
            config=config,
            scale=1.0,
        )
    )
    assert all(torch.equal(empty[n], v) for n, v in base_model.items())


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 4096])
def test_materialize(
    tmp_path: Path, base_model: dict[str, torch.Tensor], max_shard_bytes: int
) -> None:
    config = TransformConfig()
    tuned = finetune(base_model, seed=5, prefix="transformer.")
    src = tmp_path / "src"
    save(src / "model.safetensors", tuned)
    (src / "config.json").write_text(
        json.dumps({"architectures": ["GPT2ForSequenceClassification"]})
    )
    base = open_dict(tmp_path / "b.safetensors", base_model)
    ckpt = CheckpointReader.open(src)
    result = fold(
        base=base, checkpoint=ckpt, parent=None, seed=8, config=config, out_dir=tmp_path / "v"
    )
    calls: list[tuple[int, int]] = []
    dest = tmp_path / "dest"
    shards = materialize(
        base=base,
        superposition=_reader(result.superposition),
        private=_reader(result.private),
        seed=8,
        key_map=result.key_map,
        config=config,
        scale=1.0,
        out_dir=dest,
        side_files=ckpt.side_files,
        max_shard_bytes=max_shard_bytes,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert (dest / "config.json").read_text() == (src / "config.json").read_text()
    assert calls[-1][0] == calls[-1][1] == len(tuned)
    if len(shards) == 1:
        loaded = load_file(str(dest / "model.safetensors"))
    else:
        assert (dest / "model.safetensors.index.json").exists()
        loaded = {}
        for s in shards:
            loaded.update(load_file(str(s.path)))
    assert set(loaded) == set(tuned)
    for name, expected in tuned.items():
        assert _max_rel(loaded[name], expected) < 1e-5
    with CheckpointReader.open(dest) as again:
        assert set(again.keys()) == set(tuned)
    with pytest.raises(RandesError, match="not an empty directory"):
        materialize(
            base=base,
            superposition=None,
            private=None,
            seed=8,
            key_map=KeyMap(),
            config=config,
            scale=1.0,
            out_dir=dest,
        )


# ----------------------------------------------------------------- refusals


def _fold_pair(
    tmp_path: Path,
    base_model: dict[str, torch.Tensor],
    tuned: dict[str, torch.Tensor],
    config: TransformConfig | None = None,
) -> FoldResult:
    base = open_dict(tmp_path / "b.safetensors", base_model)
    ckpt = open_dict(tmp_path / "c.safetensors", tuned)
    return fold(
        base=base,
        checkpoint=ckpt,
        parent=None,
        seed=1,
        config=config or TransformConfig(),
        out_dir=tmp_path / "out",
    )


def _retrieve_one(tmp_path: Path, base_model: dict[str, torch.Tensor], result: FoldResult):
    base = CheckpointReader.open(tmp_path / "b.safetensors")
    return _retrieved(base, result, _reader(result.superposition), 1, TransformConfig())


def test_missing_tensor_recorded_absent(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    """A base tensor the fine-tune lacks gets no delta and is not materialized."""
    tuned = finetune(base_model, seed=1)
    del tuned["h.2.mlp.c_fc.weight"], tuned["position_ids"]
    result = _fold_pair(tmp_path, base_model, tuned)
    assert set(result.key_map.absent) == {"h.2.mlp.c_fc.weight", "position_ids"}
    got = _retrieve_one(tmp_path, base_model, result)
    assert set(got) == set(tuned)
    for name in tuned:
        assert torch.allclose(got[name], tuned[name], atol=1e-6), name


def test_wrong_base_refused_naming_both_sides(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    tuned = {f"other.{i}.weight": torch.randn(8, 8) for i in range(3)}
    with pytest.raises(IncompatibleCheckpointError, match="matches only 0%") as info:
        _fold_pair(tmp_path, base_model, tuned)
    message = str(info.value)
    assert "other.0.weight" in message and "h.0.attn.c_attn.bias" in message
    assert "\n" not in message


def test_shape_mismatch_kept_private(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    """A resized tensor (another vocabulary) cannot be a delta: it is the task's own."""
    tuned = finetune(base_model, seed=1)
    tuned["wte.weight"] = torch.randn(33, 8)
    result = _fold_pair(tmp_path, base_model, tuned)
    assert "wte.weight" in result.key_map.absent
    assert "wte.weight" in {t for shard in result.private for t in shard.tensors}
    assert torch.equal(
        _retrieve_one(tmp_path, base_model, result)["wte.weight"], tuned["wte.weight"]
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_dtype_delta_in_fp32_restored(
    tmp_path: Path, base_model: dict[str, torch.Tensor], dtype: torch.dtype
) -> None:
    """A bf16/fp16 fine-tune over an fp32 base: deltas in fp32, its dtype restored."""
    tuned = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in finetune(base_model, seed=1).items()
    }
    result = _fold_pair(tmp_path, base_model, tuned)
    assert result.key_map.dtypes == {"*": "F16" if dtype == torch.float16 else "BF16"}
    got = _retrieve_one(tmp_path, base_model, result)
    for name, want in tuned.items():
        assert got[name].dtype == want.dtype, name
        assert torch.equal(got[name], want), name  # one task, lambda 1: exact after rounding


def test_fp16_base_fp32_finetune(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    half = {k: v.half() if v.is_floating_point() else v for k, v in base_model.items()}
    tuned = finetune(half, seed=1)
    tuned = {k: v.float() if v.is_floating_point() else v for k, v in tuned.items()}
    tuned["wpe.weight"] += 1e-4  # finer than fp16 can hold: must survive
    result = _fold_pair(tmp_path, half, tuned)
    got = _retrieve_one(tmp_path, half, result)
    assert got["wpe.weight"].dtype == torch.float32
    assert torch.allclose(got["wpe.weight"], tuned["wpe.weight"], atol=1e-6)


@pytest.mark.parametrize("where", ["h.1.attn.c_attn.weight", "ln_f.bias", "score.weight"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_refused_and_nothing_left(
    tmp_path: Path, base_model: dict[str, torch.Tensor], where: str, bad: float
) -> None:
    tuned = finetune(base_model, seed=1)
    tuned[where] = tuned[where].clone()
    tuned[where].view(-1)[-1] = bad
    with pytest.raises(NonFiniteTensorError, match=where):
        _fold_pair(tmp_path, base_model, tuned, TransformConfig(max_shard_bytes=1 << 20))
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_parent_mismatch_refused(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    result = _fold_pair(tmp_path, base_model, finetune(base_model, seed=1))
    parent = _reader(result.superposition)
    base = CheckpointReader.open(tmp_path / "b.safetensors")
    ckpt = CheckpointReader.open(tmp_path / "c.safetensors")
    with pytest.raises(IncompatibleCheckpointError, match="superposition"):
        fold(
            base=base,
            checkpoint=ckpt,
            parent=parent,
            seed=2,
            config=TransformConfig(rank1="private"),  # the parent superposed rank-1 tensors
            out_dir=tmp_path / "o2",
        )
    with pytest.raises(IncompatibleCheckpointError):
        fold(
            base=base,
            checkpoint=ckpt,
            parent=parent,
            seed=2,
            config=TransformConfig(dtype="bfloat16"),
            out_dir=tmp_path / "o3",
        )


def test_fold_reports_progress(tmp_path: Path, base_model: dict[str, torch.Tensor]) -> None:
    calls: list[tuple[int, int]] = []
    base = open_dict(tmp_path / "b.safetensors", base_model)
    ckpt = open_dict(tmp_path / "c.safetensors", finetune(base_model, seed=1))
    fold(
        base=base,
        checkpoint=ckpt,
        parent=None,
        seed=1,
        config=TransformConfig(),
        out_dir=tmp_path / "o",
        progress=lambda d, t: calls.append((d, t)),
    )
    total = len(ckpt.keys())
    assert calls == [(i, total) for i in range(1, total + 1)]


def test_non_float_buffer_equal_to_base_is_not_private(
    tmp_path: Path, base_model: dict[str, torch.Tensor]
) -> None:
    result = _fold_pair(
        tmp_path,
        base_model,
        finetune(base_model, seed=1, head=False),
        TransformConfig(rank1="flip"),
    )
    assert result.private == []
