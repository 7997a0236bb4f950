"""Batch fold (randes.fold_batch) against K sequential folds, byte for byte.

Models are tiny GPT-2s made by transformers: the base a ``GPT2Model`` saved by
``save_pretrained``, each fine-tune a ``GPT2ForSequenceClassification`` started from it
and trained a few steps (backbone under ``transformer.``, a head the base lacks).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import read_digests, source_digests
from randes.errors import IncompatibleCheckpointError, NonFiniteTensorError
from randes.fold import FoldResult, fold
from randes.fold_batch import (
    BatchFoldResult,
    BatchMember,
    ScrambledPartial,
    fold_batch,
    fold_scrambled,
    scramble_task,
)
from randes.fold_members import BaseTensors
from randes.writer import WrittenShard
from tests.runtime.hf_models import make_models

SEEDS = [11, 2**40 + 7, 977, 31337]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, t1..t4 (transformers GPT-2), plus a fine-tune holding a NaN, one whose
    weight overflows float16, and a BERT fine-tune (not a GPT-2's fine-tune at all)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("batch-models")
    out = make_models(root, "gpt2", tasks=4, steps=2)
    nan = tf.GPT2ForSequenceClassification.from_pretrained(out["t2"])
    with torch.no_grad():
        nan.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    out["nan"] = root / "gpt2-nan"
    nan.save_pretrained(out["nan"])
    big = tf.GPT2ForSequenceClassification.from_pretrained(out["t3"])
    with torch.no_grad():
        big.transformer.h[0].attn.c_proj.weight[0, 0] = 7.0e4  # fp16 max is 65504
    out["big"] = root / "gpt2-big"
    big.save_pretrained(out["big"])
    torch.manual_seed(5)
    bert = tf.BertForSequenceClassification(
        tf.BertConfig(
            vocab_size=96,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    )
    out["bert"] = root / "bert"
    bert.save_pretrained(out["bert"])
    return out


@pytest.fixture
def readers(models: dict[str, Path]) -> Iterator[dict[str, CheckpointReader]]:
    with ExitStack() as stack:
        yield {k: stack.enter_context(CheckpointReader.open(p)) for k, p in models.items()}


def _open(shards: Sequence[WrittenShard]) -> CheckpointReader | None:
    return CheckpointReader.from_files([s.path for s in shards]) if shards else None


def _bytes(shards: Sequence[WrittenShard]) -> list[bytes]:
    return [s.path.read_bytes() for s in shards]


def _sequential(
    tmp: Path,
    base: CheckpointReader,
    parent: CheckpointReader | None,
    members: Sequence[tuple[CheckpointReader, int]],
    config: TransformConfig,
) -> list[FoldResult]:
    """len(members) calls of randes.fold.fold, each on the previous superposition."""
    results: list[FoldResult] = []
    with ExitStack() as stack:
        for k, (ckpt, seed) in enumerate(members):
            result = fold(
                base=base,
                checkpoint=ckpt,
                parent=parent,
                seed=seed,
                config=config,
                out_dir=tmp / f"seq{k}",
            )
            results.append(result)
            parent = _open(result.superposition)
            if parent is not None:
                stack.enter_context(parent)
    return results


def _assert_same(batch: BatchFoldResult, indices: list[int], seq: list[FoldResult]) -> None:
    """The batch's outputs are the last sequential fold's, and each member's task parts
    (private tensors, key map, delta norms) those of its own sequential fold."""
    assert list(batch.folded) == indices
    assert _bytes(batch.superposition) == _bytes(seq[-1].superposition)
    assert [s.sha256 for s in batch.serving] == [s.sha256 for s in seq[-1].serving]
    assert _bytes(batch.serving) == _bytes(seq[-1].serving)
    for index, one in zip(indices, seq, strict=True):
        got = batch.folded[index]
        assert got.key_map == one.key_map
        assert got.delta_norms == one.delta_norms
        assert got.private and _bytes(got.private) == _bytes(one.private)


@pytest.mark.parametrize(
    ("map_name", "dtype", "rank1", "with_parent"),
    [
        ("elementwise", "float32", "flip", True),
        ("elementwise", "bfloat16", "flip", True),
        ("two-sided", "float16", "plain", False),
        ("columns", "float32", "private", False),
    ],
)
def test_batch_of_three_is_three_sequential_folds_byte_for_byte(
    tmp_path: Path,
    readers: dict[str, CheckpointReader],
    map_name: str,
    dtype: str,
    rank1: str,
    with_parent: bool,
) -> None:
    config = TransformConfig(map=map_name, dtype=dtype, rank1=rank1)  # type: ignore[arg-type]
    base = readers["base"]
    with ExitStack() as stack:
        parent = None
        if with_parent:  # a bundle that already holds t1
            first = fold(
                base=base,
                checkpoint=readers["t1"],
                parent=None,
                seed=SEEDS[3],
                config=config,
                out_dir=tmp_path / "v1",
            )
            parent = stack.enter_context(_open(first.superposition))  # type: ignore[arg-type]
        members = [(readers[f"t{k}"], SEEDS[k - 2]) for k in (2, 3, 4)]
        seq = _sequential(tmp_path, base, parent, members, config)
        ticks: list[tuple[int, int]] = []
        batch = fold_batch(
            base=base,
            members=[BatchMember(ck, seed) for ck, seed in members],
            parent=parent,
            config=config,
            out_dir=tmp_path / "batch",
            progress=lambda done, total: ticks.append((done, total)),
        )
    assert batch.refused == {}
    _assert_same(batch, [0, 1, 2], seq)
    assert ticks and ticks[-1][0] == ticks[-1][1]
    # one superposition for the three tasks, not three
    assert len(list((tmp_path / "batch" / "superposition").iterdir())) == len(batch.superposition)


def test_batch_matches_sequential_without_layer_shuffle_or_serving(
    tmp_path: Path, readers: dict[str, CheckpointReader]
) -> None:
    config = TransformConfig(layer_shuffle=False, serving=None)
    members = [(readers["t2"], 5), (readers["t4"], 6)]
    seq = _sequential(tmp_path, readers["base"], None, members, config)
    batch = fold_batch(
        base=readers["base"],
        members=[BatchMember(ck, seed) for ck, seed in members],
        parent=None,
        config=config,
        out_dir=tmp_path / "batch",
    )
    assert batch.serving == []
    _assert_same(batch, [0, 1], seq)


def test_refused_members_never_block_the_others(
    tmp_path: Path, readers: dict[str, CheckpointReader]
) -> None:
    """A BERT fine-tune (refused by its headers, before any read), a fine-tune holding a
    NaN (refused mid-pass) and one overflowing float16 after its addition: the batch
    holds exactly the sequential folds of the three good ones."""
    config = TransformConfig(dtype="float16")
    order = [("t2", 1), ("bert", 2), ("t3", 3), ("nan", 4), ("big", 5), ("t4", 6)]
    batch = fold_batch(
        base=readers["base"],
        members=[BatchMember(readers[name], seed) for name, seed in order],
        parent=None,
        config=config,
        out_dir=tmp_path / "batch",
    )
    assert sorted(batch.refused) == [1, 3, 4]
    assert isinstance(batch.refused[1], IncompatibleCheckpointError)
    assert isinstance(batch.refused[3], NonFiniteTensorError)
    assert "NaN" in str(batch.refused[3])
    assert isinstance(batch.refused[4], NonFiniteTensorError)
    assert "overflow" in str(batch.refused[4])
    good = [(readers[name], seed) for name, seed in order if name.startswith("t")]
    seq = _sequential(tmp_path, readers["base"], None, good, config)
    _assert_same(batch, [0, 2, 5], seq)
    # the aborted passes left no file behind: one master, one serving copy, three privates
    leftovers = sorted(
        p.relative_to(tmp_path / "batch").as_posix()
        for p in (tmp_path / "batch").rglob("*")
        if p.is_file()
    )
    expected = sorted(
        p.relative_to(tmp_path / "batch").as_posix()
        for shards in [
            batch.superposition,
            batch.serving,
            *(m.private for m in batch.folded.values()),
        ]
        for p in (s.path for s in shards)
    )
    assert leftovers == expected


def test_every_member_refused_writes_nothing(
    tmp_path: Path, readers: dict[str, CheckpointReader]
) -> None:
    batch = fold_batch(
        base=readers["base"],
        members=[BatchMember(readers["bert"], 1), BatchMember(readers["nan"], 2)],
        parent=None,
        config=TransformConfig(),
        out_dir=tmp_path / "batch",
    )
    assert sorted(batch.refused) == [0, 1] and batch.folded == {}
    assert batch.superposition == [] and batch.serving == []
    assert not [p for p in (tmp_path / "batch").rglob("*") if p.is_file()]


def test_scrambled_partials_reduce_to_the_batch_bytes(
    tmp_path: Path, readers: dict[str, CheckpointReader]
) -> None:
    """The map/reduce split (scramble each task apart, add the partials in order) gives
    the batch's bytes; a partial overflowing the bundle dtype is refused at the reduce."""
    config = TransformConfig(dtype="float16")
    order = [("t2", 21), ("t3", 22), ("big", 23), ("t4", 24)]
    scrambled = [
        scramble_task(
            base=readers["base"],
            checkpoint=readers[name],
            seed=seed,
            config=config,
            out_dir=tmp_path / f"map{k}",
        )
        for k, (name, seed) in enumerate(order)
    ]
    assert all(len(s.delta) == 1 for s in scrambled)
    with ExitStack() as stack:
        partials = [
            ScrambledPartial(stack.enter_context(_open(s.delta)), s.fold)  # type: ignore[arg-type]
            for s in scrambled
        ]
        reduced = fold_scrambled(
            base=readers["base"],
            partials=partials,
            parent=None,
            config=config,
            out_dir=tmp_path / "reduce",
        )
    assert sorted(reduced.refused) == [2] and "overflow" in str(reduced.refused[2])
    good = [(readers[name], seed) for name, seed in order if name != "big"]
    seq = _sequential(tmp_path, readers["base"], None, good, config)
    _assert_same(reduced, [0, 1, 3], seq)
    with pytest.raises(NonFiniteTensorError, match="NaN"):
        scramble_task(
            base=readers["base"],
            checkpoint=readers["nan"],
            seed=1,
            config=config,
            out_dir=tmp_path / "map-nan",
        )
    assert not [p for p in (tmp_path / "map-nan").rglob("*") if p.is_file()]


class _Watched(CheckpointReader):
    """A checkpoint reader that counts its reads, and makes the first two reads on
    helper threads (of any watched reader) wait for each other: a batch that never reads
    two at once fails with BrokenBarrierError."""

    lock = threading.Lock()
    helper_reads = 0
    both = threading.Barrier(2, timeout=30)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: Counter[str] = Counter()

    def get(self, name: str) -> torch.Tensor:
        helper = threading.current_thread() is not threading.main_thread()
        with _Watched.lock:
            self.reads[name] += 1
            ticket = _Watched.helper_reads
            _Watched.helper_reads += helper
        if helper and ticket < 2:
            _Watched.both.wait()
        return super().get(name)


def test_members_are_read_ahead_at_once_and_each_tensor_read_and_hashed_once(
    tmp_path: Path, models: dict[str, Path], readers: dict[str, CheckpointReader]
) -> None:
    """Several members' tensors are read (and hashed) ahead on two threads at once,
    still once each: the digests are those of a hashing pass of their own, and the
    bytes those of sequential folds."""
    config = TransformConfig()
    names = ["t2", "t3", "t4"]
    seeds = [3, 4, 5]
    with ExitStack() as stack:
        watched = [stack.enter_context(_Watched.open(models[n])) for n in names]
        for reader in watched:
            reader.record()  # hashed as the pass reads it (storage.batch does the same)
        batch = fold_batch(
            base=readers["base"],
            members=[BatchMember(r, s) for r, s in zip(watched, seeds, strict=True)],
            parent=None,
            config=config,
            out_dir=tmp_path / "batch",
        )
        assert batch.refused == {} and _Watched.helper_reads > len(names)
        for name, reader in zip(names, watched, strict=True):
            assert set(reader.reads) == set(reader) and set(reader.reads.values()) == {1}
            with CheckpointReader.open(models[name]) as fresh:
                assert read_digests(reader) == source_digests(fresh, legacy=False)
    members = [(readers[n], s) for n, s in zip(names, seeds, strict=True)]
    seq = _sequential(tmp_path, readers["base"], None, members, config)
    _assert_same(batch, [0, 1, 2], seq)


def test_base_tensors_asked_by_two_threads_at_once_are_read_once(
    models: dict[str, Path],
) -> None:
    calls: list[str] = []
    started = threading.Event()

    class Slow(CheckpointReader):  # the base, slowed so that the second ask comes mid-read
        def get(self, name: str) -> torch.Tensor:
            calls.append(name)
            started.set()
            time.sleep(0.2)
            return super().get(name)

    with Slow.open(models["base"]) as base:
        name = max(base, key=lambda n: base.meta(n).nbytes)
        bases = BaseTensors(base, budget=2**30)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(bases.get, name)
            started.wait(10)
            second = pool.submit(bases.get, name)
            assert first.result() is second.result()
        assert calls == [name]
        assert bases.get(name) is first.result() and calls == [name]  # kept
