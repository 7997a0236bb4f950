"""Several OS processes folding into one bundle at once, on PostgreSQL + S3 (SeaweedFS).

- four processes, released together, each fold a different task: every fold lands
  exactly once, as versions 1..4 chained by parent, and the head is exactly the sum
  of the four scrambled deltas: its superposition is recomputed byte for byte by a
  sequential fold of the same seeds in version order, matches sum_t T_t(delta_t)
  computed independently in float64, and every task materializes as
  base + T_t^-1(S) with its private tensors bit-exact;
- the same checkpoint sent twice at once (under one task name or two) is folded once:
  one version, one ledger row, the other command reports it skipped.

Checkpoints are tiny BERTs saved by transformers' ``save_pretrained``: a bare
``BertModel`` base and fine-tunes trained a few steps from it, their encoder under
``bert.``; each has its own number of labels (so its own head and config.json), and one
is a token classifier (no pooler: a fine-tune lacking tensors its base has).

The processes are forked from a forkserver that has torch and the pipeline imported,
and released by a barrier. A second barrier holds every process's first registry
commit until all of them are there, so the race for the next version is certain to
happen at the database (not merely likely, depending on the machine's load).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import func, select

from randes.checkpoint import CheckpointReader
from randes.config import TransformConfig
from randes.digests import source_digest
from randes.fold import fold as core_fold
from randes.layout import layout_of
from randes.transforms import TaskTransform
from storage.registry.engine import make_engine
from storage.registry.models import IngestionLedger
from storage.settings import Settings
from storage.workspace import Workspace
from tests.hf_models import save_base, save_finetune

BUNDLE = "shared"
BASE = "tiny"
N_PROCS = 4
BARRIER_TIMEOUT_S = 120.0

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(
    ["torch", "storage.workspace", "flows.cli", __name__, "tests.pipeline.test_faults"]
)


# ------------------------------------------------------------------- children
def _redirect(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _use_env(env: dict[str, str]) -> None:
    # The forkserver kept the environment of whichever test started it.
    for name in [n for n in os.environ if n.startswith(("RANDES_", "AWS_"))]:
        del os.environ[name]
    os.environ.update(env)


def _hold_first_commit(barrier: Any) -> None:
    """Make this process's first registry commit wait until every process is at its own."""
    from storage.registry import Registry

    commit = Registry.commit_version
    state = {"first": True}

    def wait_then_commit(self: Any, *args: Any, **kw: Any) -> Any:
        if state["first"]:
            state["first"] = False
            barrier.wait(BARRIER_TIMEOUT_S)
        return commit(self, *args, **kw)

    Registry.commit_version = wait_then_commit  # type: ignore[method-assign]


def _fold_child(
    env: dict[str, str], source: str, task: str, start: Any, at_commit: Any, result: str
) -> None:
    """Workspace.fold in this process, released by ``start``; the outcome as JSON."""
    _redirect(result + ".log")
    _use_env(env)
    _hold_first_commit(at_commit)
    from storage.workspace import Workspace

    ws = Workspace.open()
    try:
        ws.base_manifest(BASE)  # connections to the registry and the store are warm
        start.wait(BARRIER_TIMEOUT_S)
        outcome = ws.fold(BUNDLE, source, task)
        data: dict[str, Any] = {
            "task": outcome.task,
            "version": outcome.version,
            "skipped": outcome.skipped,
            "seed": outcome.seed,
            "attempts": outcome.attempts,
        }
    except Exception as exc:  # noqa: BLE001 - reported by the test
        data = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        ws.close()
    Path(result).write_text(json.dumps(data))
    sys.stdout.flush()
    os._exit(0)


def _cli_child(env: dict[str, str], argv: list[str], start: Any, at_commit: Any, log: str) -> None:
    """`randes ARGV` (flows.cli.main) in this process, released by ``start``."""
    _redirect(log)
    _use_env(env)
    _hold_first_commit(at_commit)
    from flows.cli import main

    start.wait(BARRIER_TIMEOUT_S)
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()


# -------------------------------------------------------------------- helpers
@pytest.fixture
def remote(
    s3_server: Any, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """Settings (and a RANDES_* environment for children) on S3 + PostgreSQL."""
    if not s3_server.running:
        s3_server.start()
    for name in list(os.environ):
        if name.startswith("RANDES_"):
            monkeypatch.delenv(name)
    env = {
        "RANDES_HOME": str(tmp_path / "home"),
        "RANDES_DATABASE_URL": postgres_url,
        "RANDES_STORE_URL": f"s3://{s3_server.new_bucket('conc')}/randes",
        "RANDES_S3_ENDPOINT_URL": s3_server.endpoint_url,
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


def _child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("RANDES_", "AWS_"))}


def _digest(path: Path) -> str:
    with CheckpointReader.open(path) as reader:
        return source_digest(reader)


def _ledger_rows(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            query = select(func.count()).select_from(IngestionLedger)
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


PREFIX = "bert."  # where transformers saves a task model's encoder


def _finetunes(base_dir: Path, root: Path) -> dict[str, Path]:
    """``task0..task3``: sequence classifiers with 2..5 labels, task1 a token classifier."""
    return {
        f"task{i}": save_finetune(
            base_dir,
            root / f"task{i}",
            i + 1,
            num_labels=2 + i,
            task="BertForTokenClassification" if i == 1 else None,
        )
        for i in range(N_PROCS)
    }


def _max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-12)
    return float((got.double() - want.double()).abs().max() / scale)


# ---------------------------------------------------------------------- tests
def test_concurrent_folds_of_different_tasks_all_land_once(
    remote: Settings, tmp_path: Path
) -> None:
    base_dir = save_base(tmp_path / "models" / "base")
    sources = _finetunes(base_dir, tmp_path / "models")
    config = TransformConfig()
    with Workspace(remote) as ws:
        ws.init()
        ws.add_base(BASE, str(base_dir))
        ws.create_bundle(BUNDLE, BASE, config)

    start, at_commit = _CTX.Barrier(N_PROCS), _CTX.Barrier(N_PROCS)
    results = {task: tmp_path / f"{task}.json" for task in sources}
    _run_all(
        [
            _CTX.Process(
                target=_fold_child,
                args=(_child_env(), str(src), task, start, at_commit, str(results[task])),
                daemon=True,
            )
            for task, src in sources.items()
        ]
    )
    outcomes = {}
    for task, path in results.items():
        log = Path(str(path) + ".log")
        assert path.exists(), log.read_text(errors="replace") if log.exists() else task
        outcomes[task] = json.loads(path.read_text())
        assert "error" not in outcomes[task], outcomes[task]
    print(f"\nattempts per fold: { {t: o['attempts'] for t, o in outcomes.items()} }")

    # Every fold landed once, none skipped, as versions 1..4.
    assert not any(o["skipped"] for o in outcomes.values())
    assert sorted(o["version"] for o in outcomes.values()) == list(range(1, N_PROCS + 1))
    # All four committed at the same moment at first: three lost and rebuilt.
    attempts = sorted(o["attempts"] for o in outcomes.values())
    assert all(a >= 2 for a in attempts[1:]), attempts

    fresh = remote.model_copy(update={"cache_dir": tmp_path / "check-cache"})
    with Workspace(fresh) as ws:
        records = ws.registry.list_versions(BUNDLE)
        assert [r.version for r in records] == list(range(1, N_PROCS + 1))
        assert [r.parent_version for r in records] == [None, *range(1, N_PROCS)]
        manifests = [ws.manifest(r) for r in records]
        head = manifests[-1]
        order = [t.name for t in head.tasks]
        assert sorted(order) == sorted(sources)
        assert len({t.seed for t in head.tasks}) == N_PROCS
        for entry in head.tasks:
            outcome = outcomes[entry.name]
            assert (entry.added_in_version, entry.seed) == (outcome["version"], outcome["seed"])
            assert ws.registry.ledger_lookup(BUNDLE, _digest(sources[entry.name])) == (
                entry.name,
                outcome["version"],
            )
        # Version k holds exactly the first k tasks: nothing lost, nothing applied twice.
        for k, manifest in enumerate(manifests, start=1):
            assert [t.name for t in manifest.tasks] == order[:k]
            assert [t.seed for t in manifest.tasks] == [t.seed for t in head.tasks[:k]]
        registry_tasks = {t.name: (t.seed, t.added_in_version) for t in ws.registry.tasks(BUNDLE)}
        assert registry_tasks == {t.name: (t.seed, t.added_in_version) for t in head.tasks}
        assert _ledger_rows(remote.resolved_database_url) == N_PROCS

        # 1. A sequential in-process fold of the same seeds, in version order, rebuilds
        #    every version's superposition byte for byte.
        with CheckpointReader.open(base_dir) as base:
            parent_files: list[Path] = []
            for k, manifest in enumerate(manifests, start=1):
                entry = manifest.tasks[-1]
                out = tmp_path / f"sequential-{k}"
                with CheckpointReader.open(sources[entry.name]) as checkpoint:
                    parent = CheckpointReader.from_files(parent_files) if parent_files else None
                    try:
                        result = core_fold(
                            base=base,
                            checkpoint=checkpoint,
                            parent=parent,
                            seed=entry.seed,
                            config=config,
                            out_dir=out,
                        )
                    finally:
                        if parent is not None:
                            parent.close()
                assert [s.sha256 for s in result.superposition] == [
                    r.sha256 for r in manifest.superposition
                ], f"version {k}"
                parent_files = [s.path for s in result.superposition]

            # 2. Independently: S_head == sum_t T_t(delta_t), in float64 (a tensor a
            #    fine-tune lacks, the token classifier's pooler, adds no delta).
            layout = layout_of(base, config)
            transforms = {t.name: TaskTransform(layout, t.seed) for t in head.tasks}
            tuned = {
                name: load_file(str(src / "model.safetensors")) for name, src in sources.items()
            }
            expected: dict[str, torch.Tensor] = {}
            for source in layout.superposed:
                theta = base.get(source).double()
                for name, transform in transforms.items():
                    if PREFIX + source not in tuned[name]:
                        continue
                    delta = tuned[name][PREFIX + source].double() - theta
                    slot = transform.slot_of(source)
                    value = transform.scramble_one(source, delta)
                    expected[slot] = expected.get(slot, 0) + value
            stored: dict[str, torch.Tensor] = {}
            for ref in head.superposition:
                stored |= load_file(str(ws.cache.fetch(ref)))
            assert stored.keys() == expected.keys()
            for slot, want in expected.items():
                assert _max_rel(stored[slot], want) < 1e-6, slot

            # 3. Every task materializes as base + T_t^-1(S) (lambda = 1), privates exact.
            for name, transform in transforms.items():
                dest = ws.materialize(
                    BUNDLE, None, name, tmp_path / "out" / name, scale=1.0, master=True
                )
                got = load_file(str(dest / "model.safetensors"))
                assert got.keys() == tuned[name].keys()
                for key, tensor in tuned[name].items():
                    source = key.removeprefix(PREFIX)
                    if key.startswith(PREFIX) and source in layout.superposed:
                        slot = transform.slot_of(source)
                        want = base.get(source).double() + transform.unscramble_one(
                            source, expected[slot]
                        )
                        assert _max_rel(got[key], want) < 1e-6, (name, key)
                    else:  # rank-1 (private policy), the task head, int buffers
                        assert torch.equal(got[key], tensor), (name, key)
                config_of = json.loads((sources[name] / "config.json").read_text())
                assert json.loads((dest / "config.json").read_text()) == config_of, name


@pytest.mark.parametrize(
    "names", [("same", "same"), ("first", "second")], ids=["one-name", "two-names"]
)
def test_same_checkpoint_sent_twice_at_once_is_folded_once(
    remote: Settings, tmp_path: Path, names: tuple[str, str]
) -> None:
    base_dir = save_base(tmp_path / "models" / "base")
    source = save_finetune(base_dir, tmp_path / "models" / "dup", 7)
    with Workspace(remote) as ws:
        ws.init()
        ws.add_base(BASE, str(base_dir))
        ws.create_bundle(BUNDLE, BASE, TransformConfig())

    start, at_commit = _CTX.Barrier(2), _CTX.Barrier(2)
    logs = [tmp_path / f"fold-{i}.log" for i in range(2)]
    procs = [
        _CTX.Process(
            target=_cli_child,
            args=(
                _child_env(),
                ["fold", BUNDLE, str(source), "--task", task],
                start,
                at_commit,
                str(log),
            ),
            daemon=True,
        )
        for task, log in zip(names, logs, strict=True)
    ]
    _run_all(procs)
    outputs = [log.read_text(errors="replace") for log in logs]
    assert not at_commit.broken, "both folds should have reached the registry commit"

    folded = [i for i, text in enumerate(outputs) if "version 1 adds task" in text]
    assert len(folded) == 1, outputs
    winner, loser = folded[0], 1 - folded[0]
    assert procs[winner].exitcode == 0, outputs
    if names[0] == names[1]:  # a retry of the same fold: a no-op
        assert procs[loser].exitcode == 0, outputs
        assert f"already folded as task {names[winner]!r} in version 1" in outputs[loser]
        assert "nothing to do" in outputs[loser], outputs
    else:  # the same bytes under another name: refused, the bundle holds them once
        assert procs[loser].exitcode == 1, outputs
        assert outputs[loser].startswith("error: this checkpoint is already in bundle"), outputs
        assert f"as task {names[winner]!r} (version 1)" in outputs[loser], outputs
    winner = names[winner]

    with Workspace(remote) as ws:
        assert [v.version for v in ws.registry.list_versions(BUNDLE)] == [1]
        assert [t.name for t in ws.registry.tasks(BUNDLE)] == [winner]
        assert [t.name for t in ws.resolve(BUNDLE)[1].tasks] == [winner]
        assert ws.registry.ledger_lookup(BUNDLE, _digest(source)) == (winner, 1)
        assert _ledger_rows(remote.resolved_database_url) == 1
        ws.materialize(BUNDLE, None, winner, tmp_path / "out")
