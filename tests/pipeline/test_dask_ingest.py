"""Ingestion over a real Dask cluster (distributed.LocalCluster, 2 worker processes on
loopback): the workers scramble, one reduce commits the version a single-process batch
fold gives, byte for byte, for the same seeds.

The checkpoints are tiny BERTs saved by transformers' ``save_pretrained`` over a bare
``BertModel`` base: a sequence classifier in fp32, one saved in bf16, a token classifier
(no pooler), and one whose training diverged (an Inf weight)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import storage.batch
from flows.pipeline import IngestRefusedError, ingest_flow
from randes.config import TransformConfig
from storage.batch import BatchItem, fold_many
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

pytestmark = pytest.mark.usefixtures("prefect_harness")

TASKS = ["alpha", "beta", "gamma"]
SHAPES: dict[str, dict[str, Any]] = {
    "alpha": {},
    "beta": {"dtype": "bfloat16"},
    "gamma": {"task": "BertForTokenClassification"},
}


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    """The base `new_bundle` registers: a bare BertModel saved by transformers."""
    return save_base(tmp_path / "models" / "base")


def _inf(model: Any) -> None:
    model.bert.encoder.layer[0].intermediate.dense.weight[1, 1] = float("inf")


def test_ingest_on_a_two_worker_cluster_commits_the_batch_folds_bytes(
    new_bundle: Callable[..., None],
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from distributed import LocalCluster

    new_bundle("b")
    source = tmp_path / "incoming"
    for k, name in enumerate(TASKS, start=1):
        save_finetune(base_dir, source / name, k, **SHAPES[name])
    save_finetune(base_dir, source / "broken", 9, edit=_inf)

    def seeds() -> Callable[[], int]:  # the flow draws every seed before the map step
        counter = itertools.count(1)
        return lambda: next(counter) * 104729

    monkeypatch.setattr(storage.batch, "new_task_seed", seeds())
    # Workers are new processes: they read the RANDES_* environment set by the fixtures.
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        with pytest.raises(IngestRefusedError, match="broken: .*holds NaN or Inf"):
            ingest_flow(
                "b", str(source), run_validation=False, dask_address=cluster.scheduler_address
            )
        again = ingest_flow(
            "b", str(source / "alpha"), run_validation=False, dask_address=cluster.scheduler_address
        )

    with Workspace.open() as ws:
        assert [v.version for v in ws.registry.list_versions("b")] == [1]
        record, got = ws.resolve("b")
        assert [t.name for t in got.tasks] == TASKS
        # seeds drawn for the four found (alpha, beta, broken, gamma), in their order
        assert [t.seed for t in got.tasks] == [104729, 2 * 104729, 4 * 104729]
        # every scrambled delta the workers stored was deleted after the commit, and the
        # reduce's local copies with them
        assert ws.gc(grace_s=0, dry_run=True).deleted == []
        kept = {r.sha256 for r in [*got.shards(), *ws.base_manifest("tiny").shards]}
        assert {p.name.split(".")[0] for p in ws.cache.root.iterdir()} <= kept
    assert again["folded"] == [] and again["version"] is None

    # the same checkpoints, the same seeds, folded by one process
    monkeypatch.setattr(storage.batch, "new_task_seed", seeds())
    with Workspace(Settings(home=tmp_path / "single")) as single:
        single.init()
        single.add_base("tiny", str(base_dir))
        single.create_bundle("b", "tiny", TransformConfig())
        names = ["alpha", "beta", "broken", "gamma"]
        outcome = fold_many(single, "b", [BatchItem(str(source / n), n) for n in names])
        assert outcome.version == 1 and list(outcome.refused) == ["broken"]
        _, want = single.resolve("b")
    assert [r.sha256 for r in got.superposition] == [r.sha256 for r in want.superposition]
    assert got.serving is not None and want.serving is not None
    assert [r.sha256 for r in got.serving.shards] == [r.sha256 for r in want.serving.shards]

    assert [t.model_dump(mode="json") for t in got.tasks] == [
        t.model_dump(mode="json") for t in want.tasks
    ]
