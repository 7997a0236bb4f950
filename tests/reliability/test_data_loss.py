"""The data-loss cases of issue 16, each through the real command line.

Every case was a fold lost, a bundle poisoned or a wrong delta recorded while the
command said it succeeded. Each test drives `flows.cli.main` on the embedded default
(local store + SQLite) and, where the store or the registry is involved, on SeaweedFS
+ PostgreSQL too, and ends with the drift check (tests/reliability/drift.py): every
version's superposition recomputed from its tasks' sources finds no difference.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file, save_file
from sqlalchemy import MetaData, insert, select

from randes.checkpoint import CheckpointReader
from randes.digests import source_digests
from storage.registry.engine import make_engine
from storage.registry.models import Bundle, IngestionLedger
from storage.settings import Settings
from tests.cli_run import Result, cli
from tests.hf_models import resave, save_base, save_finetune, set_weight
from tests.reliability.conftest import assert_one_error_line, child_env, run_cli, start_cli
from tests.reliability.drift import assert_no_drift

BUNDLE = "b"
BASE = "tiny"


def ok(*argv: str) -> Result:
    result = cli(*argv)
    assert result.code == 0, (argv, result)
    return result


def refused(*argv: str, needle: str = "") -> str:
    result = cli(*argv)
    assert result.code == 1, (argv, result)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    assert "Traceback" not in result.out + result.err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@dataclass
class Models:
    root: Path
    base: Path
    tasks: dict[str, Path]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """A tiny bare GPT2Model and four sequence classifiers trained from it (backbone
    under ``transformer.``, head ``score``), saved by transformers' ``save_pretrained``."""
    root = tmp_path_factory.mktemp("data-loss-models")
    base = save_base(root / "base", "gpt2")
    tasks = {name: save_finetune(base, root / name, i + 1) for i, name in enumerate("abcd")}
    return Models(root, base, tasks)


@dataclass
class Env:
    settings: Settings
    kind: str
    s3: Any = None

    @property
    def home(self) -> Path:
        return self.settings.home


def _setenv(mp: pytest.MonkeyPatch, settings: Settings) -> None:
    for name in [n for n in os.environ if n.startswith("RANDES_")]:
        mp.delenv(name)
    for name, value in child_env(settings).items():
        mp.setenv(name, value)


@pytest.fixture(params=["local", "s3_postgres"])
def env(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    home = tmp_path / "home"
    fields: dict[str, Any] = {"home": home, "database_url": None, "store_url": None}
    server = None
    if request.param == "s3_postgres":
        server = request.getfixturevalue("s3_server")
        if not server.running:
            server.start()
        fields |= {
            "database_url": request.getfixturevalue("postgres_url"),
            "store_url": f"s3://{server.new_bucket('loss')}/randes",
            "s3_endpoint_url": server.endpoint_url,
            "s3_retry_seconds": 10,
        }
    settings = Settings(**fields)
    _setenv(monkeypatch, settings)
    return Env(settings, request.param, server)


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    settings = Settings(home=tmp_path / "home", database_url=None, store_url=None)
    _setenv(monkeypatch, settings)
    return Env(settings, "local")


def _setup(models: Models, *tasks: str, options: tuple[str, ...] = ()) -> None:
    ok("init")
    ok("base", "add", BASE, str(models.base))
    ok("bundle", "create", BUNDLE, "--base", BASE, *options)
    for task in tasks:
        ok("fold", BUNDLE, str(models.tasks[task]), "--task", task)


def _tasks() -> dict[str, dict[str, Any]]:
    rows = json.loads(ok("tasks", BUNDLE, "--json").out)
    return {row["task"]: row for row in rows}


def snapshot_registry_and_store(home: Path) -> dict[str, Any]:
    """Every registry row and every stored object (embedded default under ``home``)."""
    engine = make_engine(f"sqlite:///{home / 'registry.db'}")
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as conn:
            tables = {
                name: sorted(repr(tuple(row)) for row in conn.execute(select(table)))
                for name, table in sorted(meta.tables.items())
            }
    finally:
        engine.dispose()
    store = home / "store"
    objects = sorted(
        (str(p.relative_to(store)), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in store.rglob("*")
        if p.is_file()
    )
    return {"tables": tables, "objects": objects}


@contextlib.contextmanager
def leaves_registry_and_store(home: Path) -> Iterator[None]:
    """Asserts that the block (refusals) leaves every registry row and stored object of
    the embedded default under ``home`` as it found them."""
    before = snapshot_registry_and_store(home)
    yield
    assert snapshot_registry_and_store(home) == before


def _digest(path: Path) -> str:
    with CheckpointReader.open(path) as reader:
        return source_digests(reader).content


# --------------------------------------------------------- refold after remove
def test_refold_after_remove_folds_again(env: Env, models: Models) -> None:
    _setup(models, "a", "b")
    ok("remove", BUNDLE, "a")
    assert set(_tasks()) == {"b"}
    result = ok("fold", BUNDLE, str(models.tasks["a"]), "--task", "a")
    assert "version 4 adds task 'a'" in result.out, result
    assert set(_tasks()) == {"a", "b"}
    # ... and once more under another name after another remove (a ledger row per fold)
    ok("remove", BUNDLE, "a")
    assert "adds task 'a2'" in ok("fold", BUNDLE, str(models.tasks["a"]), "--task", "a2").out
    assert set(_tasks()) == {"a2", "b"}
    ok("materialize", BUNDLE, "a2", str(env.home.parent / "out-a2"))
    assert_no_drift(env.settings, BUNDLE)


def test_refold_after_a_remove_of_the_old_kind(local: Env, models: Models) -> None:
    """A registry whose `remove` left the ledger row in place (before this fix): the
    stale row no longer stops the checkpoint from being folded again."""
    _setup(models, "a")
    ok("remove", BUNDLE, "a")
    engine = make_engine(local.settings.resolved_database_url)
    try:
        with engine.begin() as conn:
            bundle_id = conn.execute(Bundle.__table__.select()).first().id  # type: ignore[union-attr]
            conn.execute(
                insert(IngestionLedger).values(
                    bundle_id=bundle_id,
                    source_sha256=_digest(models.tasks["a"]),
                    task_name="a",
                    version=1,
                )
            )
    finally:
        engine.dispose()
    assert (
        "version 3 adds task 'a'" in ok("fold", BUNDLE, str(models.tasks["a"]), "--task", "a").out
    )
    assert_no_drift(local.settings, BUNDLE)


def test_retried_remove_is_a_no_op_like_a_retried_fold(local: Env, models: Models) -> None:
    _setup(models, "a", "b")
    ok("remove", BUNDLE, "a")
    before = snapshot_registry_and_store(local.home)
    assert "already removed in version 3: nothing to do" in ok("remove", BUNDLE, "a").out
    assert snapshot_registry_and_store(local.home) == before
    refused("remove", BUNDLE, "never-there", needle="no task 'never-there'")
    assert set(_tasks()) == {"b"}


# ---------------------------------------------------------------- finite overflow
def _with(models: Models, name: str, key: str, value: float, src: str = "b") -> Path:
    """Task ``src`` with every element of ``key`` set to ``value``, saved again by
    ``save_pretrained`` (a finite but huge fine-tune, as a diverging run leaves)."""
    return resave(models.tasks[src], models.root / name, set_weight(key, None, value))


def test_fold_that_would_overflow_float16_is_refused(local: Env, models: Models) -> None:
    _setup(models, "a", options=("--dtype", "float16"))
    before = snapshot_registry_and_store(local.home)
    big = _with(models, "fp16-overflow", "transformer.wte.weight", 1e5)
    refused("fold", BUNDLE, str(big), "--task", "big", needle="overflow float16")
    assert snapshot_registry_and_store(local.home) == before
    ok("materialize", BUNDLE, "a", str(local.home.parent / "out-a"))


def test_two_finite_checkpoints_that_overflow_float32_are_refused(env: Env, models: Models) -> None:
    _setup(models, "a")
    first = _with(models, f"huge-1-{env.kind}", "transformer.wte.weight", 2e38, src="b")
    second = _with(models, f"huge-2-{env.kind}", "transformer.wte.weight", 2e38, src="c")
    ok("fold", BUNDLE, str(first), "--task", "huge1")  # alone it is finite
    before = snapshot_registry_and_store(env.home) if env.kind == "local" else None
    refused("fold", BUNDLE, str(second), "--task", "huge2", needle="overflow float32")
    if before is not None:
        assert snapshot_registry_and_store(env.home) == before
    assert set(_tasks()) == {"a", "huge1"}
    for task in ("a", "huge1"):
        out = env.home.parent / f"out-{task}"
        ok("materialize", BUNDLE, task, str(out))
        state = load_file(str(out / "model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())
    assert_no_drift(env.settings, BUNDLE)


# ------------------------------------------------ source rewritten during a fold
def test_source_rewritten_during_the_fold_is_refused(
    local: Env, models: Models, tmp_path: Path
) -> None:
    _setup(models, "a")
    victim = tmp_path / "victim"
    victim.mkdir()
    blob = (models.tasks["b"] / "model.safetensors").read_bytes()
    other = (models.tasks["c"] / "model.safetensors").read_bytes()
    assert len(blob) == len(other) and blob[:64] == other[:64]  # same header, other data
    (victim / "model.safetensors").write_bytes(blob)
    before = snapshot_registry_and_store(local.home)
    child = start_cli(
        child_env(local.settings),
        ["fold", BUNDLE, str(victim), "--task", "victim"],
        tmp_path / "logs",
        point="stop@compute-start",  # hashed, not folded yet
    )
    try:
        child.wait_stopped()
        with open(victim / "model.safetensors", "r+b") as fh:  # rewritten in place
            fh.write(other)
        child.resume()
        child.join()
    finally:
        child.kill()
    assert_one_error_line(child, "changed since the checkpoint was hashed")
    assert snapshot_registry_and_store(local.home) == before
    # the retry folds what the file holds now, and records that
    retry = run_cli(
        child_env(local.settings), ["fold", BUNDLE, str(victim), "--task", "victim"], tmp_path
    )
    assert retry.proc.exitcode == 0, retry.output()
    assert _tasks()["victim"]["source_sha256"] == _digest(victim)  # c's tensors now
    c_only = tmp_path / "c-only"
    c_only.mkdir()
    (c_only / "model.safetensors").write_bytes(other)
    assert _digest(victim) == _digest(c_only)
    ok("remove", BUNDLE, "victim")
    assert_no_drift(local.settings, BUNDLE)


# ------------------------------------------------------------- stale S3 source
def _put_dir(client: Any, bucket: str, prefix: str, directory: Path) -> None:
    for path in sorted(directory.iterdir()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def _clear(client: Any, bucket: str, prefix: str) -> None:
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
    for item in listed:
        client.delete_object(Bucket=bucket, Key=item["Key"])


def _sharded(models: Models, task: str, name: str) -> Path:
    directory = models.root / name
    directory.mkdir(exist_ok=True)
    state = load_file(str(models.tasks[task] / "model.safetensors"))
    save_torch_state_dict(state, str(directory), max_shard_size=40_000)
    assert (directory / "model.safetensors.index.json").is_file()
    (directory / "config.json").write_bytes((models.tasks[task] / "config.json").read_bytes())
    return directory


def test_replaced_s3_source_is_fetched_again(
    models: Models,
    s3_server: Any,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not s3_server.running:
        s3_server.start()
    bucket = s3_server.new_bucket("src")
    settings = Settings(
        home=tmp_path / "home",
        database_url=postgres_url,
        store_url=f"s3://{s3_server.new_bucket('store')}/randes",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_retry_seconds=10,
    )
    _setenv(monkeypatch, settings)
    client = s3_server.client()
    _setup(models, "a")
    uri = f"s3://{bucket}/incoming/x"
    _put_dir(client, bucket, "incoming/x", _sharded(models, "b", "b-sharded"))
    ok("fold", BUNDLE, uri, "--task", "first")
    assert _tasks()["first"]["source_sha256"] == _digest(models.tasks["b"])
    # the same uri now holds another checkpoint, in another layout (one file)
    _clear(client, bucket, "incoming/x")
    _put_dir(client, bucket, "incoming/x", models.tasks["c"])
    refused("remove", BUNDLE, "first", needle="changed since it was folded")
    ok("fold", BUNDLE, uri, "--task", "second")
    assert _tasks()["second"]["source_sha256"] == _digest(models.tasks["c"])
    # a single object replaced under the same key
    key_uri = f"s3://{bucket}/single/model.safetensors"
    client.upload_file(
        str(models.tasks["d"] / "model.safetensors"), bucket, "single/model.safetensors"
    )
    ok("fold", BUNDLE, key_uri, "--task", "third")
    client.upload_file(
        str(models.tasks["b"] / "model.safetensors"), bucket, "single/model.safetensors"
    )
    refused("remove", BUNDLE, "third", needle="changed since it was folded")
    _clear(client, bucket, "incoming/x")
    _put_dir(client, bucket, "incoming/x", _sharded(models, "b", "b-sharded"))
    ok("remove", BUNDLE, "first")
    client.upload_file(
        str(models.tasks["d"] / "model.safetensors"), bucket, "single/model.safetensors"
    )
    ok("remove", BUNDLE, "third")
    # a single file replaced by a shard set: no stale model.safetensors is left to fold
    uri_y = f"s3://{bucket}/incoming/y"
    _put_dir(client, bucket, "incoming/y", models.tasks["b"])
    ok("fold", BUNDLE, uri_y, "--task", "fourth")
    _clear(client, bucket, "incoming/y")
    _put_dir(client, bucket, "incoming/y", _sharded(models, "d", "d-sharded"))
    ok("fold", BUNDLE, uri_y, "--task", "fifth")
    assert _tasks()["fifth"]["source_sha256"] == _digest(models.tasks["d"])
    ok("remove", BUNDLE, "fifth")
    _clear(client, bucket, "incoming/y")
    _put_dir(client, bucket, "incoming/y", models.tasks["b"])
    ok("remove", BUNDLE, "fourth")
    assert set(_tasks()) == {"a", "second"}
    _clear(client, bucket, "incoming/x")
    _put_dir(client, bucket, "incoming/x", models.tasks["c"])
    head = max(int(r["version"]) for r in json.loads(ok("versions", BUNDLE, "--json").out))
    assert_no_drift(settings, BUNDLE, versions={head})


# ------------------------------------------------------ re-serialized checkpoint
def _padded(blob: bytes, extra: int) -> bytes:
    n = struct.unpack("<Q", blob[:8])[0]
    header = blob[8 : 8 + n] + b" " * extra
    return struct.pack("<Q", len(header)) + header + blob[8 + n :]


def test_reserialized_checkpoint_is_the_same_checkpoint(local: Env, models: Models) -> None:
    _setup(models, "a")
    before = snapshot_registry_and_store(local.home)
    src = models.tasks["a"] / "model.safetensors"
    padded = models.root / "a-padded"
    padded.mkdir(exist_ok=True)
    (padded / "model.safetensors").write_bytes(_padded(src.read_bytes(), 24))
    (padded / "config.json").write_bytes((models.tasks["a"] / "config.json").read_bytes())
    resaved = models.root / "a-resaved"
    resaved.mkdir(exist_ok=True)
    save_file(load_file(str(src)), str(resaved / "model.safetensors"), metadata={"format": "pt"})
    (resaved / "config.json").write_bytes((models.tasks["a"] / "config.json").read_bytes())
    sharded = models.root / "a-sharded"
    sharded.mkdir(exist_ok=True)
    save_torch_state_dict(load_file(str(src)), str(sharded), max_shard_size=40_000)
    (sharded / "config.json").write_bytes((models.tasks["a"] / "config.json").read_bytes())
    for copy in (padded, resaved, sharded):
        assert (copy / "model.safetensors").exists() or (
            copy / "model.safetensors.index.json"
        ).exists()
        refused("fold", BUNDLE, str(copy), "--task", f"dup-{copy.name}", needle="already in bundle")
        assert "nothing to do" in ok("fold", BUNDLE, str(copy), "--task", "a").out
    assert snapshot_registry_and_store(local.home) == before


def test_rows_of_the_file_digest_era_still_match(local: Env, models: Models) -> None:
    """A ledger row holding the old file-bytes digest still makes a refold a no-op, and
    a task recorded with it can still be removed."""
    _setup(models, "a")
    engine = make_engine(local.settings.resolved_database_url)
    with CheckpointReader.open(models.tasks["a"]) as reader:
        digests = source_digests(reader)
    try:
        with engine.begin() as conn:
            conn.execute(  # a row of that era: its digest kind unknown (before 0004)
                IngestionLedger.__table__.update().values(
                    source_sha256=digests.legacy, digest_kind=None
                )
            )
    finally:
        engine.dispose()
    assert "nothing to do" in ok("fold", BUNDLE, str(models.tasks["a"]), "--task", "a").out
    ok("fold", BUNDLE, str(models.tasks["b"]), "--task", "b")
    assert_no_drift(local.settings, BUNDLE)


# ------------------------------------------------------------ ambiguous directory
def test_directory_with_a_single_file_and_shards_folds_what_transformers_loads(
    local: Env, models: Models
) -> None:
    _setup(models, "a")
    mixed = models.root / "mixed"
    mixed.mkdir(exist_ok=True)
    save_torch_state_dict(
        load_file(str(models.tasks["c"] / "model.safetensors")), str(mixed), max_shard_size=40_000
    )
    (mixed / "model.safetensors").write_bytes(
        (models.tasks["b"] / "model.safetensors").read_bytes()
    )
    (mixed / "config.json").write_bytes((models.tasks["b"] / "config.json").read_bytes())
    assert (mixed / "model.safetensors.index.json").is_file()
    ok("fold", BUNDLE, str(mixed), "--task", "mixed")
    assert _tasks()["mixed"]["source_sha256"] == _digest(models.tasks["b"])
    out = local.home.parent / "out-mixed"
    ok("materialize", BUNDLE, "mixed", str(out), "--master")
    got = load_file(str(out / "model.safetensors"))
    want_b = load_file(str(models.tasks["b"] / "model.safetensors"))
    want_c = load_file(str(models.tasks["c"] / "model.safetensors"))
    key = "score.weight"  # private to the task: stored verbatim
    assert torch.equal(got[key], want_b[key]) and not torch.equal(got[key], want_c[key])
    assert_no_drift(local.settings, BUNDLE)


# --------------------------------------------------------------- base with NaN
def test_base_holding_nan_is_refused_at_base_add(local: Env, models: Models) -> None:
    ok("init")
    before = snapshot_registry_and_store(local.home)
    nan = set_weight("h.1.mlp.c_fc.weight", (3, 4), float("nan"))  # the bare base's own name
    nan_base = resave(models.base, models.root / "nan-base", nan)
    refused("base", "add", "nanbase", str(nan_base), needle="NaN or Inf")
    assert snapshot_registry_and_store(local.home) == before
    refused("bundle", "create", BUNDLE, "--base", "nanbase", needle="nanbase")


# ------------------------------------------------- validate: bundle invariants
def _commit_tampered(settings: Settings, slot_value: float) -> int:
    """Commit, behind the pipeline's back, a version whose master holds ``slot_value``
    in one slot (stored under its true sha256: only the invariant check can see it)."""
    import uuid

    from storage.commit import Upload, commit_manifest, release, upload
    from storage.workspace import Workspace

    with Workspace(settings) as ws:
        head = ws.registry.head(BUNDLE)
        assert head is not None
        manifest = ws.manifest(head)
        ref = manifest.superposition[0]
        path = ws.cache.fetch(ref)
        tensors = load_file(str(path))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = slot_value
        bad = settings.home.parent / "tampered.safetensors"
        save_file(tensors, str(bad))
        owner = uuid.uuid4().hex
        new_ref = upload(ws.store, Upload.of_file(bad, tensors=sorted(tensors)))
        tampered = manifest.model_copy(
            update={
                "version": head.version + 1,
                "parent_version": head.version,
                "superposition": [new_ref, *manifest.superposition[1:]],
                "serving": None,
            }
        )
        commit_manifest(ws.store, ws.registry, tampered, owner)
        release(ws.registry, owner)
        return head.version + 1


def test_validate_rejects_a_version_with_a_non_finite_slot(local: Env, models: Models) -> None:
    _setup(models, "a", "b")
    version = _commit_tampered(local.settings, float("inf"))
    result = cli("validate", BUNDLE, "--version", str(version))
    assert result.code == 3, result  # the gate's verdict, not an error
    text = " ".join(result.out.split())  # the console wraps long lines
    assert "broken invariants" in text and "holds NaN or Inf" in text, result.out
    rows = {r["version"]: r for r in json.loads(ok("versions", BUNDLE, "--json").out)}
    assert rows[version]["status"] == "rejected"
    assert "validated" in ok("validate", BUNDLE, "--version", str(version - 1)).out


def test_validate_rejects_a_version_with_a_missing_object(env: Env, models: Models) -> None:
    _setup(models, "a", "b")
    from storage.workspace import Workspace

    with Workspace(env.settings) as ws:
        head = ws.registry.head(BUNDLE)
        assert head is not None
        victim = ws.manifest(head).tasks[-1].private[0].key
        ws.store.delete(victim)
    result = cli("validate", BUNDLE)
    assert result.code == 3, result
    text = " ".join(result.out.split())  # the console wraps long lines
    assert f"object {victim} is missing from the store" in text, result.out
    assert json.loads(ok("versions", BUNDLE, "--json").out)[-1]["status"] == "rejected"
