"""Behaviour of the artifact store, the same tests for a local directory and for S3.

The S3 side runs against a real SeaweedFS (tests/services/seaweed.py), no mocks:
conditional writes, multipart uploads, ranged reads and outages are exercised on
the wire. Outage tests use a private server so stopping it never disturbs the
session server other tests share.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from randes.errors import IntegrityError, RandesError
from storage.errors import (
    InvalidKeyError,
    InvalidStoreUrlError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from storage.store import LocalStore, ObjectStore, S3Store, open_store, validate_key
from tests.services.seaweed import SeaweedServer

MiB = 1024 * 1024


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest) -> ObjectStore:
    fixture = "local_store" if request.param == "local" else "s3_store"
    result: ObjectStore = request.getfixturevalue(fixture)
    return result


@pytest.fixture(scope="module")
def big_blob() -> bytes:
    """Just over two 5 MiB parts: three parts, the last one short."""
    return os.urandom(2 * 5 * MiB + 123_457)


# --------------------------------------------------------------- round trips
def test_bytes_roundtrip(store: ObjectStore) -> None:
    assert store.put_bytes("manifests/a.json", b'{"a": 1}') is True
    assert store.get_bytes("manifests/a.json") == b'{"a": 1}'
    assert store.get_bytes("manifests/a.json", sha256=sha(b'{"a": 1}')) == b'{"a": 1}'
    assert store.put_bytes("empty", b"") is True
    assert store.get_bytes("empty", sha256=sha(b"")) == b""


def test_file_roundtrip_creates_parents(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = write(tmp_path / "src.bin", data)
    key = f"objects/{sha(data)[:2]}/{sha(data)}"
    assert store.put_file(key, src, sha256=sha(data)) is True
    dest = tmp_path / "out" / "deep" / "shard.safetensors"
    store.get_file(key, dest, sha256=sha(data))
    assert dest.read_bytes() == data
    # Unknown digest (sources fetched by URI): no verification, same bytes.
    other = tmp_path / "out2" / "x"
    store.get_file(key, other, sha256=None)
    assert other.read_bytes() == data
    assert not [p for p in dest.parent.iterdir() if p.name != dest.name]  # no temp leftovers


def test_put_file_is_idempotent(store: ObjectStore, tmp_path: Path) -> None:
    data = b"shard bytes" * 1000
    src = write(tmp_path / "a", data)
    assert store.put_file("objects/k", src, sha256=sha(data)) is True
    assert store.put_file("objects/k", src, sha256=sha(data)) is False
    assert store.get_bytes("objects/k") == data
    # Create-if-absent: a put of other bytes under an existing key changes nothing.
    assert store.put_bytes("objects/k", b"other") is False
    assert store.get_bytes("objects/k") == data


def test_put_bytes_replace(store: ObjectStore) -> None:
    assert store.put_bytes("aliases/production", b"v1") is True
    assert store.put_bytes("aliases/production", b"v2", if_absent=False) is True
    assert store.get_bytes("aliases/production") == b"v2"


def test_put_file_with_wrong_sha_stores_nothing(
    store: ObjectStore, tmp_path: Path, big_blob: bytes
) -> None:
    for name, data in (("small", b"abc" * 100), ("big", big_blob)):
        src = write(tmp_path / name, data)
        with pytest.raises(IntegrityError, match="does not match"):
            store.put_file(f"objects/{name}", src, sha256=sha(b"something else"))
        assert not store.exists(f"objects/{name}")
    assert list(store.list()) == []


def test_multipart_roundtrip(store: ObjectStore, tmp_path: Path, big_blob: bytes) -> None:
    if isinstance(store, S3Store):
        assert len(big_blob) > 2 * store.part_size  # really multipart, really parallel reads
    src = write(tmp_path / "big.bin", big_blob)
    digest = sha(big_blob)
    assert store.put_file("objects/big", src, sha256=digest) is True
    assert store.put_file("objects/big", src, sha256=digest) is False
    assert store.stat("objects/big").size == len(big_blob)
    dest = tmp_path / "dl" / "big.bin"
    store.get_file("objects/big", dest, sha256=digest)
    assert sha(dest.read_bytes()) == digest
    assert store.get_bytes("objects/big", sha256=digest) == big_blob


def test_concurrent_puts_of_one_key_write_once(
    store: ObjectStore, tmp_path: Path, big_blob: bytes
) -> None:
    src = write(tmp_path / "big.bin", big_blob)
    results: list[bool] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(store.put_file("objects/race", src, sha256=sha(big_blob)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=put) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert True in results
    if isinstance(store, LocalStore):
        # link(2) is atomic: exactly one writer wins. On S3 that depends on the server:
        # AWS evaluates If-None-Match atomically, SeaweedFS 4.x lets overlapping
        # completions all succeed. Harmless for content-addressed keys (same bytes).
        assert sorted(results) == [False, False, True]
    assert store.get_bytes("objects/race", sha256=sha(big_blob)) == big_blob
    assert [i.key for i in store.list()] == ["objects/race"]


# ---------------------------------------------------------------- integrity
def test_get_file_sha_mismatch_leaves_dest_untouched(store: ObjectStore, tmp_path: Path) -> None:
    store.put_bytes("objects/x", b"stored bytes")
    dest = write(tmp_path / "dest" / "x", b"previous content")
    with pytest.raises(IntegrityError, match="objects/x"):
        store.get_file("objects/x", dest, sha256=sha(b"expected bytes"))
    assert dest.read_bytes() == b"previous content"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["x"]
    missing = tmp_path / "dest" / "y"
    with pytest.raises(IntegrityError):
        store.get_file("objects/x", missing, sha256=sha(b"expected bytes"))
    assert not missing.exists()
    with pytest.raises(IntegrityError, match="objects/x"):
        store.get_bytes("objects/x", sha256=sha(b"expected bytes"))


def test_missing_key(store: ObjectStore, tmp_path: Path) -> None:
    assert not store.exists("nope/x")
    with pytest.raises(ObjectNotFoundError, match="nope/x"):
        store.get_bytes("nope/x")
    with pytest.raises(ObjectNotFoundError):
        store.get_file("nope/x", tmp_path / "d", sha256=None)
    assert not (tmp_path / "d").exists()
    with pytest.raises(ObjectNotFoundError):
        store.stat("nope/x")
    store.delete("nope/x")  # no error
    assert issubclass(ObjectNotFoundError, StoreError)
    assert issubclass(StoreError, RandesError)


# --------------------------------------------------------------- list/delete
def test_list_stat_delete(store: ObjectStore) -> None:
    keys = ["objects/ab/2", "objects/ab/1", "objects/a-b", "objects/b/3", "manifests/m.json", "z"]
    for i, key in enumerate(keys):
        store.put_bytes(key, b"x" * i)
    listed = list(store.list())
    assert [info.key for info in listed] == sorted(keys)  # S3 order on both backends
    sizes = {info.key: info.size for info in listed}
    assert sizes == {key: i for i, key in enumerate(keys)}
    now = datetime.now(UTC)
    for info in listed:
        assert info.last_modified.tzinfo is not None
        assert info.last_modified.utcoffset() == timedelta(0)
        assert abs(now - info.last_modified) < timedelta(minutes=5)
    assert [i.key for i in store.list("objects/")] == sorted(
        k for k in keys if k.startswith("objects/")
    )
    assert [i.key for i in store.list("objects/a")] == [
        "objects/a-b",
        "objects/ab/1",
        "objects/ab/2",
    ]
    assert [i.key for i in store.list("objects/ab/")] == ["objects/ab/1", "objects/ab/2"]
    assert list(store.list("nothing/")) == []
    info = store.stat("objects/b/3")
    assert (info.key, info.size) == ("objects/b/3", 3)
    store.delete("objects/ab/1")
    store.delete("objects/ab/1")
    assert not store.exists("objects/ab/1")
    assert [i.key for i in store.list("objects/ab")] == ["objects/ab/2"]


# -------------------------------------------------------------------- keys
BAD_KEYS = [
    "",
    "/abs",
    "a//b",
    "a/",
    "../up",
    "a/../b",
    "a/./b",
    ".",
    "a\\b",
    "ctl\x00",
    "new\nline",
    "del\x7f",
    "a/.tmp-reserved",
    "x" * 300,
]


@pytest.fixture(scope="module", params=["local", "s3"])
def offline_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> ObjectStore:
    """Keys are validated before any I/O: no server, no bucket needed (and no cost)."""
    if request.param == "local":
        return LocalStore(tmp_path_factory.mktemp("offline"))
    return S3Store("never-contacted", endpoint_url="http://127.0.0.1:9", retry_timeout=0)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_rejected(offline_store: ObjectStore, key: str, tmp_path: Path) -> None:
    store = offline_store
    with pytest.raises(InvalidKeyError):
        store.put_bytes(key, b"x")
    with pytest.raises(ValueError):  # InvalidKeyError is a ValueError too
        store.get_bytes(key)
    with pytest.raises(InvalidKeyError):
        store.exists(key)
    with pytest.raises(InvalidKeyError):
        store.get_file(key, tmp_path / "d", sha256=None)
    with pytest.raises(InvalidKeyError):
        store.delete(key)


def test_invalid_prefixes_rejected(offline_store: ObjectStore) -> None:
    store = offline_store
    for prefix in ("/a", "../", "a/../", "a//", "a\nb"):
        with pytest.raises(InvalidKeyError):
            list(store.list(prefix))


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_valid_keys_stay_inside_the_root(key: str) -> None:
    root = Path("/srv/store")
    try:
        validate_key(key)
    except InvalidKeyError:
        return
    path = LocalStore(root)._path(key)
    assert path.is_relative_to(root) and path != root
    assert ".." not in path.relative_to(root).parts


# ------------------------------------------------------------- open_store
def test_open_store_urls(tmp_path: Path) -> None:
    local = open_store((tmp_path / "my store").as_uri())
    assert isinstance(local, LocalStore) and local.root == tmp_path / "my store"
    s3 = open_store("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.url) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    for url in ("ftp://x/y", "file://host/x", "s3:///prefix", "relative/dir", "s3://b/../x"):
        with pytest.raises((InvalidStoreUrlError, InvalidKeyError)):
            open_store(url)
    with pytest.raises(InvalidStoreUrlError) as excinfo:
        open_store("s3://AKIAEXAMPLE:hunter2@bucket/x")
    assert "hunter2" not in str(excinfo.value) and "AKIAEXAMPLE" not in str(excinfo.value)


def test_local_ensure_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "a" / "b")
    store.ensure_root()
    store.ensure_root()
    assert (tmp_path / "a" / "b").is_dir()
    write(tmp_path / "file", b"")
    with pytest.raises(StoreError):
        LocalStore(tmp_path / "file").ensure_root()


def test_local_ignores_crash_leftovers(local_store: LocalStore) -> None:
    local_store.put_bytes("objects/a", b"1")
    write(local_store.root / "objects" / ".tmp-0123abcd-b", b"partial")
    assert [i.key for i in local_store.list()] == ["objects/a"]


# ------------------------------------------------------------------ S3 only
def test_s3_prefix_and_ensure_root(s3_server: SeaweedServer) -> None:
    bucket = f"ensure-{os.urandom(6).hex()}"
    store = open_store(f"s3://{bucket}/team/randes", endpoint_url=s3_server.endpoint_url)
    store.ensure_root()
    store.ensure_root()  # idempotent
    store.put_bytes("objects/a", b"1")
    raw = s3_server.client().list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in raw["Contents"]] == ["team/randes/objects/a"]
    assert [i.key for i in store.list()] == ["objects/a"]
    sibling = open_store(f"s3://{bucket}/team/other", endpoint_url=s3_server.endpoint_url)
    assert list(sibling.list()) == []


def test_s3_missing_bucket_is_a_clear_error(s3_server: SeaweedServer) -> None:
    store = S3Store("no-such-bucket-here", endpoint_url=s3_server.endpoint_url)
    with pytest.raises(StoreError, match="randes init"):
        store.put_bytes("a", b"x")
    with pytest.raises(StoreError, match="randes init"):
        store.get_bytes("a")
    with pytest.raises(StoreError, match="randes init"):
        list(store.list())


def test_s3_fallback_without_conditional_writes(s3_store: S3Store, tmp_path: Path) -> None:
    """Servers answering 501 to If-None-Match get HEAD-then-PUT with the same results."""
    s3_store._conditional = False
    data = os.urandom(11 * MiB)
    src = write(tmp_path / "f", data)
    assert s3_store.put_file("objects/f", src, sha256=sha(data)) is True
    assert s3_store.put_file("objects/f", src, sha256=sha(data)) is False
    assert s3_store.put_bytes("m", b"1") is True
    assert s3_store.put_bytes("m", b"2") is False
    assert s3_store.get_bytes("m") == b"1"


def test_s3_failed_multipart_leaves_no_upload(
    s3_store: S3Store, s3_server: SeaweedServer, tmp_path: Path, big_blob: bytes
) -> None:
    src = write(tmp_path / "big", big_blob)
    with pytest.raises(IntegrityError):
        s3_store.put_file("objects/bad", src, sha256=sha(b"not it"))
    uploads = s3_server.client().list_multipart_uploads(Bucket=s3_store.bucket)
    assert not uploads.get("Uploads")


# ------------------------------------------------------------------ outages
@pytest.fixture(scope="module")
def outage_server(
    s3_server: SeaweedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SeaweedServer]:
    """A private server to stop and restart, with the session's credentials (so the
    boto3 chain, set up by ``s3_server``, signs for both)."""
    server = SeaweedServer(
        tmp_path_factory.mktemp("outage") / "data",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
    )
    with server:
        yield server


def _outage_store(server: SeaweedServer, retry_timeout: float) -> S3Store:
    store = S3Store(
        f"outage-{os.urandom(5).hex()}",
        endpoint_url=server.endpoint_url,
        part_size=5 * MiB,
        retry_timeout=retry_timeout,
        connect_timeout=1.0,
        read_timeout=5.0,
    )
    store.ensure_root()
    return store


def test_server_stopped_then_restarted(outage_server: SeaweedServer) -> None:
    store = _outage_store(outage_server, retry_timeout=1.5)
    store.put_bytes("objects/kept", b"survives the restart")
    outage_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError) as excinfo:
            store.get_bytes("objects/kept")
        elapsed = time.monotonic() - started
        message = str(excinfo.value)
        assert outage_server.endpoint_url.removeprefix("http://") in message
        assert "objects/kept" in message
        assert outage_server.access_key not in message
        assert outage_server.secret_key not in message
        assert elapsed < 15, elapsed  # bounded: budget plus one attempt's own retries
        with pytest.raises(StoreUnavailableError):
            store.put_bytes("objects/new", b"x")
    finally:
        outage_server.start()
    assert store.get_bytes("objects/kept") == b"survives the restart"
    assert store.put_bytes("objects/new", b"x") is True


def test_transient_outage_is_retried(outage_server: SeaweedServer, tmp_path: Path) -> None:
    store = _outage_store(outage_server, retry_timeout=30.0)
    data = os.urandom(12 * MiB)
    src = write(tmp_path / "blob", data)
    store.put_bytes("objects/before", b"written before the outage")
    outage_server.stop()
    restarter = threading.Timer(2.0, outage_server.start)
    restarter.start()
    try:
        started = time.monotonic()
        assert store.get_bytes("objects/before") == b"written before the outage"
        assert time.monotonic() - started > 1.0  # it really waited for the restart
        assert store.put_file("objects/blob", src, sha256=sha(data)) is True
    finally:
        restarter.join()
        if not outage_server.running:
            outage_server.start()
    dest = tmp_path / "out"
    store.get_file("objects/blob", dest, sha256=sha(data))
    assert dest.read_bytes() == data


def test_interrupted_download_resumes(outage_server: SeaweedServer, tmp_path: Path) -> None:
    """A stream cut mid-body is resumed from the next byte once the server is back.

    White-box: the sink of the streaming reader stops the server on the first chunk,
    so the cut is deterministic (the body is far larger than socket buffers).
    """
    store = _outage_store(outage_server, retry_timeout=30.0)
    data = os.urandom(40 * MiB)
    store.put_file("objects/big", write(tmp_path / "big", data), sha256=sha(data))
    received = bytearray()
    restarter: list[threading.Timer] = []

    def sink(chunk: bytes) -> None:
        received.extend(chunk)
        if not restarter:
            outage_server.stop()
            restarter.append(threading.Timer(1.0, outage_server.start))
            restarter[0].start()

    try:
        assert store._stream("objects/big", sink) == len(data)
    finally:
        for timer in restarter:
            timer.join()
        if not outage_server.running:
            outage_server.start()
    assert sha(bytes(received)) == sha(data)


def test_local_key_that_is_also_a_directory(local_store: LocalStore) -> None:
    """S3 holds ``a`` and ``a/b`` side by side; a directory tree cannot: a clear error."""
    local_store.put_bytes("a/b", b"1")
    with pytest.raises(InvalidKeyError, match="directory"):
        local_store.put_bytes("a", b"2")
    local_store.put_bytes("c", b"1")
    with pytest.raises(InvalidKeyError, match="directory"):
        local_store.put_bytes("c/d", b"2")
    assert [i.key for i in local_store.list()] == ["a/b", "c"]


def test_put_file_move_links_the_callers_file_in(local_store: LocalStore, tmp_path: Path) -> None:
    """``move=True``: a file handed over is linked into the store (no copy), published
    under its key like a copy would be, and a second put is the usual no-op."""
    data = os.urandom(3 * MiB + 17)
    work = write(local_store.root.parent / "work" / "shard", data)  # same file system
    assert local_store.put_file("objects/moved", work, sha256=sha(data), move=True) is True
    stored = local_store.root / "objects" / "moved"
    assert os.path.samefile(stored, work) and stored.stat().st_nlink == 2
    work.unlink()  # the work directory goes away; the object stays
    assert local_store.get_bytes("objects/moved", sha256=sha(data)) == data
    again = write(tmp_path / "again", data)
    assert local_store.put_file("objects/moved", again, sha256=sha(data), move=True) is False
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".tmp-")]


def test_cache_adopts_a_written_shard_without_a_download(
    local_store: LocalStore, tmp_path: Path
) -> None:
    from randes.manifest import ShardRef
    from storage.cache import ObjectCache

    data = os.urandom(MiB)
    shard = write(tmp_path / "work" / "shard", data)
    ref = ShardRef(key="objects/s", sha256=sha(data), size=len(data), tensors=[])
    local_store.put_file(ref.key, shard, sha256=ref.sha256, move=True)
    cache = ObjectCache(tmp_path / "cache", local_store)
    cache.adopt(ref, shard)
    local_store.delete(ref.key)  # a download would now fail: the adopted copy serves
    path = cache.fetch(ref)
    assert path.read_bytes() == data
    # a later process verifies the adopted copy like any other, and heals a damaged one
    path.write_bytes(b"x" * len(data))
    local_store.put_bytes(ref.key, data, if_absent=False)
    assert ObjectCache(tmp_path / "cache", local_store).fetch(ref).read_bytes() == data
