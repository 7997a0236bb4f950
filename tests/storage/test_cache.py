"""The object cache trusts a copy it verified, across processes, only while the copy's
stamp (device, inode, size, mtime, ctime) is the one recorded when it matched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import storage.cache
from randes.manifest import ShardRef
from storage.cache import ObjectCache
from storage.store import LocalStore

MiB = 1 << 20


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every file the cache hashes to verify it."""
    calls: list[Path] = []
    real = storage.cache.file_sha256

    def counting(path: Path) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(storage.cache, "file_sha256", counting)
    return calls


def _stored(store: LocalStore, data: bytes) -> ShardRef:
    sha = hashlib.sha256(data).hexdigest()
    store.put_bytes(f"objects/{sha}", data, if_absent=True)
    return ShardRef(key=f"objects/{sha}", sha256=sha, size=len(data), tensors=[])


def test_a_verified_copy_is_not_hashed_again_by_a_later_process(
    local_store: LocalStore, tmp_path: Path, hashed: list[Path]
) -> None:
    data = os.urandom(MiB)
    ref = _stored(local_store, data)
    path = ObjectCache(tmp_path / "objects", local_store).fetch(ref)  # downloaded, verified
    assert hashed == []  # the download itself checked it
    again = ObjectCache(tmp_path / "objects", local_store)  # a new process, in effect
    assert again.fetch(ref) == path and path.read_bytes() == data
    assert hashed == []
    # a record that does not match (the copy replaced by another file) is not trusted
    copy = tmp_path / "copy"
    copy.write_bytes(data)
    os.replace(copy, path)
    assert ObjectCache(tmp_path / "objects", local_store).fetch(ref).read_bytes() == data
    assert hashed == [path]


def test_damage_with_the_mtime_set_back_is_still_seen(
    local_store: LocalStore, tmp_path: Path, hashed: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    data = os.urandom(MiB)
    ref = _stored(local_store, data)
    path = ObjectCache(tmp_path / "objects", local_store).fetch(ref)
    before = path.stat()
    damaged = bytearray(data)
    damaged[12345] ^= 0xFF
    with open(path, "r+b") as fh:  # same size, in place
        fh.write(damaged)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime as it was
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    got = ObjectCache(tmp_path / "objects", local_store).fetch(ref)
    assert got.read_bytes() == data  # fetched again from the store
    assert hashed == [path]
    assert "does not match its sha256" in caplog.text


def test_adopted_copies_are_recorded_once_the_work_directory_is_gone(
    local_store: LocalStore, tmp_path: Path, hashed: list[Path]
) -> None:
    data = os.urandom(MiB)
    work = tmp_path / "work"
    work.mkdir()
    shard = work / "shard"
    shard.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    ref = ShardRef(key=f"objects/{sha}", sha256=sha, size=len(data), tensors=[])
    local_store.put_file(ref.key, shard, sha256=sha, move=True)
    cache = ObjectCache(tmp_path / "objects", local_store)
    cache.adopt(ref, shard)
    shard.unlink()  # the work directory goes: the file's ctime changes
    cache.settle()
    assert ObjectCache(tmp_path / "objects", local_store).fetch(ref).read_bytes() == data
    assert hashed == []
    cache.evict(ref)
    assert not list(cache.records.iterdir())
