"""The S3 server (SeaweedFS) stopped and restarted in the middle of a pull and of a
fold, and the leftovers of a writer killed mid-upload.

(The outage that outlasts a fold's retry budget is tests/pipeline/test_faults.py's.)

- `randes pull` frozen after its third object, the server stopped, the pull resumed:
  with a 1 s retry budget, one error line naming the endpoint (no credentials), the
  destination not created (or left empty when it was an empty directory), no staging
  directory left; the retry, once the server is back, completes and every pulled object
  hashes to its name. With a 60 s budget and the server restarted meanwhile, the same
  pull completes by itself.
- `randes fold` frozen after its first upload, the server restarted meanwhile: the
  fold completes by itself, and the version verifies.
- `randes base add` of a base large enough for a multipart upload, killed after the
  first part: the incomplete upload is kept by `gc` while its lease lives (its writer
  might still be at work), aborted by `gc` once the lease expired; the retry
  completes and `gc` leaves exactly the referenced objects.
- `S3Store.sweep_incomplete` aborts only uploads older than the grace period, under
  its own prefix, and not for keys in ``keep``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.store import S3Store
from storage.workspace import Workspace
from tests.hf_models import save_base
from tests.reliability.conftest import (
    BASE,
    BUNDLE,
    Child,
    Models,
    Trials,
    assert_one_error_line,
    check_visible,
    child_env,
    expire_leases,
    fold_argv,
    make_settings,
    run_cli,
    setup_bundle,
    start_cli,
    stored_keys,
    warm_forkserver,
)

pytestmark = pytest.mark.usefixtures("no_randes_env")

MiB = 1024 * 1024
# The multipart test's base: a bare BertModel of the fault tests' width with BERT's own
# 30,522-token vocabulary, so its embedding matrix (as in real models, the largest
# tensor) makes the weight file ~24 MiB: more than one 16 MiB part.
BIG_BASE = {"hidden_size": 160, "intermediate_size": 640, "num_hidden_layers": 4}
BIG_VOCAB = 30522


@pytest.fixture
def server(s3_server: Any) -> Iterator[Any]:
    """The session's SeaweedFS, running before and after the test (tests stop it)."""
    if not s3_server.running:
        s3_server.start()
    warm_forkserver()
    yield s3_server
    if not s3_server.running:
        s3_server.start()


def _s3_settings(tmp_path: Path, server: Any, retry_s: float) -> Any:
    return make_settings(
        tmp_path / "home",
        store_url=f"s3://{server.new_bucket('rel')}/randes",
        s3_endpoint_url=server.endpoint_url,
        s3_retry_seconds=retry_s,
    )


def _uploads(server: Any, bucket: str) -> list[dict[str, Any]]:
    page = server.client().list_multipart_uploads(Bucket=bucket)
    return list(page.get("Uploads", []))


def _verify_pull(dest: Path, version: int) -> int:
    """Every object of the pulled version is there and hashes to its name."""
    pointer = json.loads((dest / "bundle.json").read_text())
    assert (pointer["bundle"], pointer["version"]) == (BUNDLE, version)
    manifest = dest / pointer["manifest_key"]
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() == pointer["manifest_sha256"]
    count = 0
    for path in (dest / "objects").rglob("*"):
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
            count += 1
    data = json.loads(manifest.read_text())
    # what the version serves: its quantized copy (a default pull has no master), else
    # the master superposition
    served = data["serving"]["shards"] if data.get("serving") else data["superposition"]
    referenced = {s["key"] for s in served}
    referenced |= {s["key"] for t in data["tasks"] for s in t["private"]}
    assert all((dest / key).is_file() for key in referenced)
    return count


def _freeze_then(child: Child, server: Any, *, restart_after: float | None) -> None:
    """Wait for the child's stop point, stop the server, resume the child; with
    ``restart_after``, start the server again that many seconds later."""
    try:
        child.wait_stopped()
        server.stop()
        child.resume()
        if restart_after is not None:
            time.sleep(restart_after)
            server.start()
        child.join(240)
    finally:
        child.kill()
        if not server.running:
            server.start()


# ------------------------------------------------------------------- mid-pull
@pytest.mark.parametrize("dest_state", ["absent", "empty-dir"])
def test_s3_stopped_mid_pull_errors_cleanly_and_the_retry_completes(
    dest_state: str, server: Any, models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = _s3_settings(tmp_path, server, retry_s=1.0)
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0", "t1")
    dest = tmp_path / "out" / "pulled"
    dest.parent.mkdir()
    if dest_state == "empty-dir":
        dest.mkdir()
    argv = ["pull", f"{BUNDLE}@2", str(dest)]

    child = start_cli(child_env(settings), argv, tmp_path / "logs", "stop@s3-get-file#3")
    _freeze_then(child, server, restart_after=None)
    line = assert_one_error_line(child, server.endpoint_url, "unavailable")
    for secret in (server.access_key, server.secret_key):
        assert secret not in child.stderr + child.stdout
    if dest_state == "absent":
        assert not dest.exists()
    else:
        assert dest.is_dir() and not any(dest.iterdir())
    left = sorted(p.name for p in dest.parent.iterdir())
    assert left == (["pulled"] if dest_state == "empty-dir" else []), left

    retry = run_cli(child_env(settings), argv, tmp_path / "logs")
    assert retry.proc.exitcode == 0 and retry.stderr == "", retry.output()
    count = _verify_pull(dest, 2)
    print(f"\nmid-pull outage ({dest_state}): {line}; retry pulled {count} objects")
    trials.record("S3 stopped mid-pull (outage > retry budget)", dest_state)


def test_s3_restarted_mid_pull_the_pull_completes(
    server: Any, models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = _s3_settings(tmp_path, server, retry_s=90.0)
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0", "t1")
    dest = tmp_path / "pulled"
    child = start_cli(
        child_env(settings),
        ["pull", f"{BUNDLE}@2", str(dest)],
        tmp_path / "logs",
        "stop@s3-get-file#3",
    )
    started = time.monotonic()
    _freeze_then(child, server, restart_after=1.0)
    assert child.proc.exitcode == 0 and child.stderr == "", child.output()
    count = _verify_pull(dest, 2)
    print(f"\nmid-pull restart: pulled {count} objects in {time.monotonic() - started:.1f}s")
    trials.record("S3 restarted mid-pull (within retry budget)", "pull")


# ------------------------------------------------------------------- mid-fold
def test_s3_restarted_mid_fold_the_fold_completes(
    server: Any, models: Models, tmp_path: Path, trials: Trials
) -> None:
    settings = _s3_settings(tmp_path, server, retry_s=90.0)
    with Workspace(settings) as ws:
        setup_bundle(ws, models, "t0")
    child = start_cli(
        child_env(settings),
        fold_argv(models, "t1"),
        tmp_path / "logs",
        "stop@after-first-upload-s3",
    )
    _freeze_then(child, server, restart_after=1.0)
    assert child.proc.exitcode == 0 and child.stderr == "", child.output()
    assert "version 2 adds task 't1'" in child.stdout
    fresh = settings.model_copy(update={"cache_dir": tmp_path / "fresh-cache"})
    with Workspace(fresh) as ws:
        assert check_visible(ws, models, tmp_path / "scratch", set()) == [1, 2]
        assert ws.gc(grace_s=0).deleted == []
        assert stored_keys(ws) == ws.registry.referenced_keys()
    trials.record("S3 restarted mid-fold (within retry budget)", "fold")


# ------------------------------------------------- incomplete multipart uploads
@pytest.fixture(scope="module")
def big_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base whose weight file (~24 MiB) goes up as a multipart upload (16 MiB parts),
    saved by transformers' ``save_pretrained``."""
    root = tmp_path_factory.mktemp("big-base")
    return save_base(root / "base", vocab_size=BIG_VOCAB, **BIG_BASE)


def test_gc_aborts_the_multipart_upload_of_a_killed_writer(
    server: Any, big_base: Path, tmp_path: Path, trials: Trials
) -> None:
    settings = _s3_settings(tmp_path, server, retry_s=10.0)
    bucket = settings.resolved_store_url.removeprefix("s3://").split("/")[0]
    with Workspace(settings) as ws:
        ws.init()
    assert (big_base / "model.safetensors").stat().st_size > 16 * MiB
    argv = ["base", "add", BASE, str(big_base)]
    dead = run_cli(child_env(settings), argv, tmp_path / "logs", "die@s3-upload-part#1")
    assert dead.proc.exitcode == -9, dead.output()
    assert len(_uploads(server, bucket)) == 1, "the killed writer left no incomplete upload"

    with Workspace(settings) as ws:
        report = ws.gc(grace_s=0)  # its lease lives: the writer might still be at work
        assert report.swept == 0 and len(_uploads(server, bucket)) == 1
        expire_leases(settings.resolved_database_url)
        report = ws.gc(grace_s=0)
        assert report.swept == 1 and _uploads(server, bucket) == []
        orphans = stored_keys(ws)

    retry = run_cli(child_env(settings), argv, tmp_path / "logs")
    assert retry.proc.exitcode == 0, retry.output()
    with Workspace(settings) as ws:
        report = ws.gc(grace_s=0)
        assert set(report.deleted) == orphans - ws.registry.referenced_keys()
        assert stored_keys(ws) == ws.registry.referenced_keys()
        assert ws.base_manifest(BASE).sha256
        for key in ws.registry.referenced_keys():
            assert ws.store.exists(key)
    trials.record("SIGKILL: base add mid-multipart-upload (S3)", "after part 1")


def test_sweep_incomplete_aborts_only_stale_unleased_uploads_under_its_prefix(
    server: Any, trials: Trials
) -> None:
    bucket = server.new_bucket("sweep")
    store = S3Store(bucket, "randes", endpoint_url=server.endpoint_url, region=server.region)
    client = server.client()
    names = ["randes/objects/aa/stale", "randes/objects/bb/leased", "other/objects/cc/foreign"]
    for name in names:
        upload = client.create_multipart_upload(Bucket=bucket, Key=name)
        client.upload_part(
            Bucket=bucket, Key=name, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
        )
    assert store.sweep_incomplete(3600) == 0  # all younger than the grace period
    assert len(_uploads(server, bucket)) == 3
    assert store.sweep_incomplete(0, keep={"objects/bb/leased"}) == 1
    assert sorted(u["Key"] for u in _uploads(server, bucket)) == sorted(names[1:])
    assert store.sweep_incomplete(0) == 1  # the lease is gone: its upload goes too
    assert [u["Key"] for u in _uploads(server, bucket)] == [names[2]]  # not ours
    trials.record("incomplete-upload sweep (S3)", "stale/young/leased/foreign", tried=4)
