"""The Prefect flows against a real (temporary) Prefect server, real files, SQLite and S3.

- ingestion is idempotent: the registry's ledger, not Prefect's cache, makes a second
  run of the same source a no-op;
- the validation gate: a version whose retrieval falls below the bundle's threshold is
  rejected and cannot be published, and the alias stays where it was;
- a transient store outage (SeaweedFS stopped, restarted a few seconds later) is
  retried by the task and the run completes.

The checkpoints are tiny BERT classifiers saved by transformers' ``save_pretrained``,
trained a few steps from the bare ``BertModel`` base of the ``base_dir`` fixture; the
gate's are token classifiers (per-token predictions on random ids vary, where a tiny
sequence classifier's are mostly one class), scored by their own transformers class.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.pipeline import IngestRefusedError, ingest_flow, publish_flow, validate_flow
from storage.registry import RejectedVersionError
from storage.workspace import Workspace
from tests.hf_models import config_of, save_finetune

pytestmark = pytest.mark.usefixtures("prefect_harness")

N_PROBES = 256
PROBE_LEN = 8
EVALUATOR = f"{__name__}:probe_accuracy"


# ------------------------------------------------------------------ evaluator
def add_probe(model_dir: Path, seed: int) -> Path:
    """Give a token classifier a tiny labelled test set: private tensors the base lacks.

    The inputs are random token ids; the labels are the fine-tune's own per-token
    predictions (its transformers class, with the weights as saved), so the fine-tuned
    model scores 1.0 and a retrieved model scores the share of predictions it preserves.
    """
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    gen = torch.Generator().manual_seed(seed)
    vocab = config_of("bert").vocab_size
    state["probe.inputs"] = torch.randint(2, vocab, (N_PROBES, PROBE_LEN), generator=gen)
    state["probe.labels"] = _predict(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


def _predict(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-token predictions on ``probe.inputs`` of a BertForTokenClassification of the
    tiny config (3 labels) holding ``state``'s weights (every one: strict), in fp32."""
    import transformers

    model = transformers.BertForTokenClassification(config_of("bert", num_labels=3))
    weights = {k: v.float() for k, v in state.items() if not k.startswith("probe.")}
    model.load_state_dict(weights, strict=True)
    model.eval()
    ids = state["probe.inputs"]
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.argmax(-1)


def probe_accuracy(state: Mapping[str, torch.Tensor], task: str) -> dict[str, float]:
    """Evaluator entry point (``module:function``) used by the validation flow."""
    hits = _predict(state) == state["probe.labels"]
    return {"accuracy": float(hits.double().mean())}


def _token_mod_3(ids: torch.Tensor) -> torch.Tensor:
    """A task a token classifier can learn: each token's id modulo 3."""
    return ids % 3


def _nan(model: Any) -> None:
    model.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("nan")


# ---------------------------------------------------------------------- tests
def test_a_refused_checkpoint_does_not_starve_the_others(
    new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    """A bad checkpoint sorted first is refused; the ones after it are still folded."""
    new_bundle("b")
    source = tmp_path / "incoming"
    save_finetune(base_dir, source / "aaa-broken", 1, edit=_nan)
    save_finetune(base_dir, source / "beta", 2)

    with pytest.raises(IngestRefusedError, match="aaa-broken"):
        ingest_flow("b", str(source))
    with Workspace.open() as ws:
        assert [t.name for t in ws.registry.tasks("b")] == ["beta"]
        head = ws.registry.head("b")
        assert head is not None and head.version == 1 and head.status == "validated"


def test_second_ingest_of_the_same_source_folds_nothing(
    new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    new_bundle("b")
    source = tmp_path / "incoming"
    save_finetune(base_dir, source / "alpha", 1)
    save_finetune(base_dir, source / "beta", 2)

    first = ingest_flow("b", str(source))
    assert first["found"] == 2
    assert first["folded"] == ["alpha", "beta"] and first["skipped"] == []
    assert first["version"] == 1 and first["status"] == "validated"  # one batch, one version

    second = ingest_flow("b", str(source))
    assert second["found"] == 2
    assert second["folded"] == [] and second["skipped"] == ["alpha", "beta"]
    assert second["version"] is None and second["status"] is None

    with Workspace.open() as ws:
        assert [v.version for v in ws.registry.list_versions("b")] == [1]
        assert ws.registry.head("b").version == 1  # type: ignore[union-attr]
        assert sorted(t.name for t in ws.registry.tasks("b")) == ["alpha", "beta"]


def test_version_under_the_gate_is_rejected_and_the_alias_stays(
    new_bundle: Callable[..., None], base_dir: Path, tmp_path: Path
) -> None:
    # lambda fixed at 1: the data-free lambda would shrink the loud cross-talk away
    new_bundle("gated", gate_threshold=0.8, scale=1.0)
    source = tmp_path / "incoming"
    token = "BertForTokenClassification"
    add_probe(save_finetune(base_dir, source / "alpha", 1, task=token), seed=1)

    first = ingest_flow("gated", str(source), evaluator=EVALUATOR)
    assert first["folded"] == ["alpha"] and first["status"] == "validated"
    assert publish_flow("gated", 1) == {"bundle": "gated", "alias": "production", "version": 1}

    # A fine-tune whose delta dwarfs the weights (10 Adam steps at lr 0.02 on a task it
    # learns: r ~ 0.4, where alpha's is ~0.001): once superposed, its cross-talk drowns
    # alpha's small delta, and alpha's retrieval falls under the gate.
    loud = save_finetune(
        base_dir, source / "loud", 2, task=token, lr=0.02, steps=10, labels=_token_mod_3
    )
    add_probe(loud, seed=2)
    second = ingest_flow("gated", str(source), evaluator=EVALUATOR)
    assert second["folded"] == ["loud"] and second["skipped"] == ["alpha"]
    assert second["version"] == 2 and second["status"] == "rejected"

    with Workspace.open() as ws:
        assert ws.registry.get_version("gated", 2).status == "rejected"
        scores = {(e.task_name, e.metric): e for e in ws.registry.evaluations("gated", 2)}
        assert scores["alpha", "accuracy"].normalized < 0.8  # type: ignore[operator]
        assert scores["loud", "accuracy"].normalized >= 0.8  # type: ignore[operator]

    with pytest.raises(RejectedVersionError):
        publish_flow("gated", 2)

    with Workspace.open() as ws:
        assert [(a.name, a.version) for a in ws.registry.aliases("gated")] == [("production", 1)]
        assert ws.registry.resolve("gated", "production").version == 1
        assert ws.registry.get_version("gated", 1).status == "published"
        assert ws.registry.get_version("gated", 2).status == "rejected"

    # Checking the serving version again (a scheduled re-validation) keeps it published.
    assert validate_flow("gated", 1, EVALUATOR).passed
    with Workspace.open() as ws:
        assert ws.registry.get_version("gated", 1).status == "published"
        assert ws.registry.resolve("gated", "production").version == 1


def test_transient_store_outage_is_retried_and_the_run_completes(
    new_bundle: Callable[..., None],
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: Any,
) -> None:
    if not s3_server.running:
        s3_server.start()
    bucket = s3_server.new_bucket("flows")
    monkeypatch.setenv("RANDES_STORE_URL", f"s3://{bucket}/randes")
    monkeypatch.setenv("RANDES_S3_ENDPOINT_URL", s3_server.endpoint_url)
    # Each store call gives up after ~1 s of retrying, so the outage reaches the task.
    monkeypatch.setenv("RANDES_S3_RETRY_SECONDS", "1")
    new_bundle("remote")
    source = tmp_path / "incoming"
    save_finetune(base_dir, source / "alpha", 1)

    # Stop the server, and start it again a few seconds after the run first hits the
    # outage (the store logs each failed attempt), whatever the machine's load.
    s3_server.stop()
    outage_seen = _LogEvent()
    store_log = logging.getLogger("storage.store.s3")
    store_log.addHandler(outage_seen)
    restart_errors: list[BaseException] = []

    def restart_later() -> None:
        outage_seen.seen.wait(timeout=120)
        time.sleep(3.0)  # past the store's 1 s budget: the task attempt has failed
        try:
            s3_server.start()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            restart_errors.append(exc)

    restarter = threading.Thread(target=restart_later, name="seaweed-restart", daemon=True)
    restarter.start()
    try:
        state = ingest_flow("remote", str(source), run_validation=False, return_state=True)
    finally:
        outage_seen.seen.set()
        restarter.join(timeout=120)
        store_log.removeHandler(outage_seen)
        if not s3_server.running:
            s3_server.start()
    assert not restart_errors, restart_errors

    assert state.is_completed(), state
    summary = state.result()
    assert summary["folded"] == ["alpha"] and summary["version"] == 1
    with Workspace.open() as ws:
        assert ws.registry.head("remote").version == 1  # type: ignore[union-attr]
        assert [t.name for t in ws.resolve("remote")[1].tasks] == ["alpha"]

    # The fold task failed on the outage and ran again: read its run back from the API.
    fold_run, history = _fold_run_history(state.state_details.flow_run_id)
    assert fold_run.run_count > 1, (fold_run.run_count, history)
    assert "AwaitingRetry" in history, history
    assert history[-1] == "Completed", history


class _LogEvent(logging.Handler):
    """A handler whose ``seen`` event is set by the first warning it receives."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.set()


def _fold_run_history(flow_run_id: uuid.UUID | None) -> tuple[Any, list[str]]:
    """The flow run's fold task run and the names of its states, oldest first.

    Task states reach the API as events recorded asynchronously: poll briefly.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    assert flow_run_id is not None
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="fold-checkpoint")),
            )
            done = [r for r in runs if r.state is not None and r.state.is_completed()]
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert len(done) == 1, [(r.name, r.state) for r in runs]
        states = client.read_task_run_states(done[0].id)
    ordered = sorted(states, key=lambda s: s.timestamp)
    return done[0], [str(s.name) for s in ordered]
