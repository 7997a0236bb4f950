"""Batch fold on the embedded default (local store + SQLite): one version for K
checkpoints, the registry and manifest K sequential folds give (seeds aside).

Checkpoints are tiny BERTs saved by transformers' ``save_pretrained``: the base a bare
``BertModel`` (pooler included), the tasks trained a few steps from it in the shapes
users have: a sequence classifier in fp32, a token classifier (no pooler: a fine-tune
lacking base tensors), a sequence classifier saved in bf16 over the fp32 base.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import storage.batch
import storage.folding
from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import source_digests
from randes.errors import CheckpointError, NonFiniteTensorError
from storage.batch import BatchItem, fold_many
from storage.registry import Registry, TaskExistsError
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

TASKS = ["alpha", "beta", "gamma"]
SHAPES: dict[str, dict[str, Any]] = {
    "alpha": {},
    "beta": {"task": "BertForTokenClassification"},
    "gamma": {"dtype": "bfloat16"},
}


def _nan(model: Any) -> None:
    model.bert.encoder.layer[1].intermediate.dense.weight[2, 3] = float("nan")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    base = save_base(root / "base")
    out = {"base": base}
    for k, name in enumerate(TASKS, start=1):
        out[name] = save_finetune(base, root / name, k, **SHAPES[name])
    out["broken"] = save_finetune(base, root / "broken", 9, edit=_nan)
    return out


def _workspace(root: Path, models: dict[str, Path]) -> Workspace:
    ws = Workspace(Settings(home=root))
    ws.init()
    ws.add_base("tiny", str(models["base"]))
    ws.create_bundle("b", "tiny", TransformConfig(dtype="bfloat16"))
    return ws


@pytest.fixture
def seeds(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Seeds drawn from one fixed sequence per workspace (both paths draw them through
    randes.rng.new_task_seed), so a batch and sequential folds can be compared."""

    def fixed() -> Any:
        counter = itertools.count(1000)
        return lambda: next(counter) * 7919

    monkeypatch.setattr(storage.folding, "new_task_seed", fixed())
    monkeypatch.setattr(storage.batch, "new_task_seed", fixed())
    yield


def _tasks(ws: Workspace) -> list[dict[str, Any]]:
    _, manifest = ws.resolve("b")
    return [t.model_dump(mode="json", exclude={"added_in_version"}) for t in manifest.tasks]


@pytest.mark.usefixtures("seeds")
def test_one_version_holds_what_sequential_folds_give(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with _workspace(tmp_path / "seq", models) as seq, _workspace(tmp_path / "bat", models) as bat:
        for name in TASKS:
            seq.fold("b", str(models[name]), name)
        ticks: list[tuple[int, int]] = []
        outcome = fold_many(
            bat,
            "b",
            [BatchItem(str(models[n]), n, scale=0.5 if n == "beta" else None) for n in TASKS],
            progress=lambda done, total: ticks.append((done, total)),
        )
        assert outcome.version == 1 and outcome.refused == {} and outcome.skipped == {}
        assert [o.task for o in outcome.folded] == TASKS
        assert ticks[-1][0] == ticks[-1][1]

        assert [v.version for v in bat.registry.list_versions("b")] == [1]
        assert [v.version for v in seq.registry.list_versions("b")] == [1, 2, 3]
        _, got = bat.resolve("b")
        _, want = seq.resolve("b")
        assert [t.added_in_version for t in got.tasks] == [1, 1, 1]
        # master and serving copy: the bytes of three sequential folds
        assert [r.sha256 for r in got.superposition] == [r.sha256 for r in want.superposition]
        assert got.serving is not None and want.serving is not None
        assert [r.sha256 for r in got.serving.shards] == [r.sha256 for r in want.serving.shards]
        expected = _tasks(seq)
        expected[1]["scale"] = 0.5
        assert _tasks(bat) == expected  # seeds, digests, key maps, norms, privates, files

        def rows(ws: Workspace) -> list[tuple[str, int, str]]:
            return [(t.name, t.seed, t.source_sha256) for t in ws.registry.tasks("b")]

        assert rows(bat) == rows(seq)
        for task in bat.registry.tasks("b"):
            assert bat.registry.ledger_lookup("b", task.source_sha256) == (task.name, 1)


def test_each_member_materializes_as_its_own_loader_expects(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    """A batch-folded task comes back in its fine-tune's shape: the same tensor names
    and dtypes (bf16 stays bf16, the token classifier gets no pooler), loadable by its
    own transformers class."""
    import transformers
    from safetensors import safe_open

    def shape(directory: Path) -> dict[str, str]:
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118

    with _workspace(tmp_path / "home", models) as ws:
        fold_many(ws, "b", [BatchItem(str(models[n]), n) for n in TASKS])
        for name in TASKS:
            out = ws.materialize("b", None, name, tmp_path / "out" / name)
            assert shape(out) == shape(models[name]), name
            cls = SHAPES[name].get("task", "BertForSequenceClassification")
            loaded = getattr(transformers, cls).from_pretrained(out, dtype="auto")
            want = SHAPES[name].get("dtype", "float32")
            assert loaded.dtype == getattr(torch, want), name


def test_a_rerun_is_a_no_op_and_bad_sources_never_block_the_others(
    tmp_path: Path, models: dict[str, Path]
) -> None:
    with _workspace(tmp_path / "home", models) as ws:
        ws.fold("b", str(models["gamma"]), "gamma")  # version 1 holds gamma
        items = [
            BatchItem(str(models["alpha"]), "alpha"),
            BatchItem(str(tmp_path / "nowhere"), "missing"),
            BatchItem(str(models["broken"]), "broken"),
            BatchItem(str(models["beta"]), "beta"),
            BatchItem(str(models["alpha"]), "alpha-again"),  # the same bytes twice
            BatchItem(str(models["gamma"]), "gamma-again"),  # already folded as gamma
            BatchItem(str(save_finetune(models["base"], tmp_path / "d", 4)), "gamma"),  # taken
        ]
        outcome = fold_many(ws, "b", items)
        assert outcome.version == 2
        assert [o.task for o in outcome.folded] == ["alpha", "beta"]
        assert sorted(outcome.refused) == ["broken", "gamma", "missing"]
        assert isinstance(outcome.refused["missing"], CheckpointError)
        assert isinstance(outcome.refused["broken"], NonFiniteTensorError)
        assert isinstance(outcome.refused["gamma"], TaskExistsError)
        assert {k: (o.task, o.version) for k, o in outcome.skipped.items()} == {
            "alpha-again": ("alpha", 2),
            "gamma-again": ("gamma", 1),
        }
        # the same bytes under a name the batch folds: skipped as that task (the ledger)
        repeat = fold_many(ws, "b", [BatchItem(str(models["beta"]), "beta-again")])
        assert repeat.version is None and [
            (o.task, o.version) for o in repeat.skipped.values()
        ] == [("beta", 2)]
        assert sorted(t.name for t in ws.registry.tasks("b")) == ["alpha", "beta", "gamma"]

        again = fold_many(ws, "b", [BatchItem(str(models[n]), n) for n in TASKS])
        assert again.version is None and again.folded == []
        assert sorted((o.task, o.version) for o in again.skipped.values()) == [
            ("alpha", 2),
            ("beta", 2),
            ("gamma", 1),
        ]
        assert [v.version for v in ws.registry.list_versions("b")] == [1, 2]


def test_a_crash_before_the_commit_leaves_nothing_visible(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    with _workspace(tmp_path / "home", models) as ws:

        def crash(self: Registry, *args: object, **kwargs: object) -> None:
            raise KeyboardInterrupt  # the process dies where the registry row would commit

        with monkeypatch.context() as patch:
            patch.setattr(Registry, "commit_version", crash)
            with pytest.raises(KeyboardInterrupt):
                fold_many(ws, "b", [BatchItem(str(models[n]), n) for n in TASKS])
        assert ws.registry.head("b") is None
        assert ws.registry.tasks("b") == []
        for name in TASKS:
            with CheckpointReader.open(models[name]) as reader:
                digest = source_digests(reader).content
            assert ws.registry.ledger_lookup("b", digest) is None
        assert not list(ws.work_root.glob("*/**/*.safetensors"))  # work dir removed
        outcome = fold_many(ws, "b", [BatchItem(str(models[n]), n) for n in TASKS])
        assert outcome.version == 1 and [o.task for o in outcome.folded] == TASKS
        # what the crashed run uploaded is unreferenced: gc reclaims it, the head is whole
        deleted = ws.gc(grace_s=0).deleted
        _, head = ws.resolve("b")
        kept = {ref.key for ref in head.shards()}
        assert deleted and not kept & set(deleted)
        assert all(ws.store.exists(key) for key in kept)


def test_task_named_twice_is_bad_input(tmp_path: Path, models: dict[str, Path]) -> None:
    with _workspace(tmp_path / "home", models) as ws:
        with pytest.raises(Exception, match="named twice"):
            fold_many(
                ws, "b", [BatchItem(str(models["alpha"]), "x"), BatchItem(str(models["beta"]), "x")]
            )
        assert ws.registry.head("b") is None


def test_heads_of_all_members_are_checked_before_hashing(
    tmp_path: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint the base refuses (a GPT-2's fine-tune offered to a BERT base) is
    never hashed, whatever its size."""
    other = save_finetune(save_base(tmp_path / "other-base", "gpt2"), tmp_path / "o", 1)
    hashed: list[str] = []

    def counting(real: Any) -> Any:
        def hashing(reader: Any, **kwargs: Any) -> Any:
            hashed.append(str(reader.files[0]))
            return real(reader, **kwargs)

        return hashing

    # hashed alone (a task name taken) or as the pass reads it
    for name in ("source_digests", "read_digests"):
        monkeypatch.setattr(storage.batch, name, counting(getattr(storage.batch, name)))
    with _workspace(tmp_path / "home", models) as ws:
        outcome = fold_many(
            ws, "b", [BatchItem(str(other), "other"), BatchItem(str(models["alpha"]), "alpha")]
        )
        assert list(outcome.refused) == ["other"] and outcome.version == 1
        assert hashed == [str(models["alpha"] / "model.safetensors")]


def test_the_command_line_folds_several_sources_as_one_version(
    randes_home: Path, models: dict[str, Path]
) -> None:
    from tests.cli_run import cli

    assert cli("init").code == 0
    assert cli("base", "add", "tiny", str(models["base"])).code == 0
    assert cli("bundle", "create", "b", "--base", "tiny").code == 0
    srcs = [str(models[n]) for n in TASKS]
    mismatch = cli("fold", "b", *srcs, "--task", "alpha", "--task", "beta")
    assert mismatch.code == 2 and "give one --task per SOURCE" in mismatch.err

    done = cli("fold", "b", *srcs, *(a for n in TASKS for a in ("--task", n)))
    assert done.code == 0, done
    assert "b: version 1 adds tasks 'alpha', 'beta', 'gamma'" in done.out

    # one source: today's command and output; then a batch with a refusal (exit 1, one
    # error line naming it) that still folds the good one
    delta = save_finetune(models["base"], randes_home.parent / "delta", 4)
    one = cli("fold", "b", str(delta), "--task", "delta")
    assert one.code == 0 and "b: version 2 adds task 'delta'" in one.out
    fresh = save_finetune(models["base"], randes_home.parent / "epsilon", 5)
    mixed = cli(
        "fold", "b", str(models["broken"]), str(fresh), str(models["alpha"]),
        "--task", "broken", "--task", "epsilon", "--task", "renamed",
    )  # fmt: skip
    assert mixed.code == 1, mixed
    assert "b: version 3 adds tasks 'epsilon'" in mixed.out
    (line,) = mixed.err.splitlines()
    assert line.startswith("error: b: folded 1, refused 2: broken: ")
    assert "renamed: this checkpoint is already in bundle 'b' as task 'alpha'" in line
