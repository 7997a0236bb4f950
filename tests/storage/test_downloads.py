"""Downloads become visible whole: `ObjectStore.get_file` renames its temporary file onto
the destination only once every byte is in it, so readers of the destination (the
object cache, another thread or process fetching the same object) never see a prefix.

Found by the validate flow on checkpoints saved by transformers: two tasks of one bundle
share a byte-identical ``config.json`` side file, the flow's worker threads fetched it
into the cache at once, one saw a short file (the writer's buffer not yet flushed when it
renamed), took it for damage and deleted it, and the other failed with
``FileNotFoundError``. Same tests for a local directory and for S3 (a real SeaweedFS).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from randes.manifest import ShardRef
from storage.cache import ObjectCache
from storage.store import ObjectStore


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    fixture = "local_store" if request.param == "local" else "s3_store"
    result: ObjectStore = request.getfixturevalue(fixture)
    return result


def _put(store: ObjectStore, data: bytes) -> ShardRef:
    digest = hashlib.sha256(data).hexdigest()
    ref = ShardRef(key=f"objects/{digest}", sha256=digest, size=len(data))
    store.put_bytes(ref.key, data)
    return ref


@pytest.mark.parametrize("size", [700, 3 * 1024 * 1024 + 17])  # a config.json, a shard
def test_dest_appears_with_every_byte(
    store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """What ``dest`` holds at the instant it appears (the rename) is the whole object."""
    data = os.urandom(size)
    ref = _put(store, data)
    dest = tmp_path / "copy"
    seen: list[int] = []
    rename = os.replace

    def watching(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == dest:
            seen.append(os.stat(src).st_size)
        rename(src, dst)

    monkeypatch.setattr(os, "replace", watching)
    store.get_file(ref.key, dest, sha256=ref.sha256)
    monkeypatch.undo()
    assert seen == [size]
    assert dest.read_bytes() == data


def test_threads_fetching_one_object_into_one_cache_all_get_it(
    store: ObjectStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Eight threads fetch one small object into a fresh cache at once, 25 times over:
    every fetch returns the verified copy, none is taken for damage."""
    data = b'{"architectures": ["BertForSequenceClassification"]}\n' * 12
    ref = _put(store, data)
    errors: list[BaseException] = []
    for round_ in range(25):
        cache = ObjectCache(tmp_path / f"cache-{round_}", store)
        start = threading.Barrier(8)

        def fetch(cache: ObjectCache = cache, start: threading.Barrier = start) -> None:
            start.wait()
            try:
                assert cache.fetch(ref, suffix="").read_bytes() == data
            except BaseException as exc:  # noqa: BLE001 - reported below, per thread
                errors.append(exc)

        threads = [threading.Thread(target=fetch) for _ in range(8)]
        with caplog.at_level(logging.WARNING, logger="storage.cache"):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    assert errors == []
    assert not [r for r in caplog.records if "does not match its sha256" in r.getMessage()]
