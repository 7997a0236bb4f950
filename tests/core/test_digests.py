"""Hashing a checkpoint while it is folded: the same digest as a pass of its own, and a
file changed while it was read is refused."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from randes import hashio
from randes.checkpoint import CheckpointReader
from randes.digests import read_digests, source_digests
from randes.errors import SourceChangedError
from tests.core.helpers import save

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.ones(5, dtype=torch.bfloat16),
    "c": torch.tensor([1, 2, 3], dtype=torch.int64),
}


def _checkpoint(root: Path) -> Path:
    save(root / "model.safetensors", TENSORS)
    (root / "config.json").write_text('{"model_type": "x"}')
    return root


def test_digest_derived_while_reading_is_the_digest_of_a_pass_of_its_own(tmp_path: Path) -> None:
    root = _checkpoint(tmp_path / "ck")
    with CheckpointReader.open(root) as alone:
        want = source_digests(alone)
    with CheckpointReader.open(root) as reader:
        reader.record()
        assert torch.equal(reader.get("a"), TENSORS["a"])  # read by "the fold"
        reader.get("a")  # read twice: must match what was recorded
        got = read_digests(reader)  # b and c were never read: hashed now
        assert got.content == want.content and got.legacy is None
        assert reader.side_sha256 == alone.side_sha256
        assert read_digests(reader, legacy=True).legacy == want.legacy
    with CheckpointReader.open(root) as reader:
        assert source_digests(reader, legacy=False).content == want.content


def test_a_file_rewritten_while_it_is_read_is_refused(tmp_path: Path) -> None:
    root = _checkpoint(tmp_path / "ck")
    path = root / "model.safetensors"
    blob = path.read_bytes()
    with CheckpointReader.open(root) as reader:
        reader.record()
        reader.get("a")
        other = bytearray(blob)
        other[reader.offset("c")] ^= 0x01  # a byte of tensor c, same size
        stat = path.stat()
        path.write_bytes(bytes(other))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the mtime back
        with pytest.raises(SourceChangedError, match="changed since the checkpoint was hashed"):
            read_digests(reader)
    # recorded bytes that change under a later read are refused at that read
    path.write_bytes(blob)
    with CheckpointReader.open(root) as reader:
        reader.record()
        reader.get("c")
        path.write_bytes(bytes(other))
        with pytest.raises(SourceChangedError):
            reader.get("c")


def test_ahead_keeps_order_surfaces_errors_and_waits_when_closed() -> None:
    assert list(hashio.ahead(lambda x: x * 2, range(5))) == [0, 2, 4, 6, 8]
    assert list(hashio.ahead(lambda x: x, [])) == []

    def failing(x: int) -> int:
        if x == 2:
            raise ValueError("two")
        return x

    got: list[int] = []
    with pytest.raises(ValueError, match="two"):
        for value in hashio.ahead(failing, range(5)):
            got.append(value)
    assert got == [0, 1]
    running = threading.Event()
    finished: list[int] = []

    def slow(x: int) -> int:
        if x == 1:
            running.set()
            time.sleep(0.2)
            finished.append(x)
        return x

    reads = hashio.ahead(slow, range(3))
    assert next(reads) == 0
    running.wait(5)
    reads.close()  # item 1 was under way: it finished before close returned
    assert finished == [1]


def test_ahead_with_a_budget_computes_several_at_once_within_it() -> None:
    """Items cost 10, the budget is 30: at most 3 started and not yet taken beyond the
    one the caller holds, two computed at once (the barrier needs both threads), and
    the results still in order."""
    lock = threading.Lock()
    started = taken = 0
    most_ahead = 0
    both = threading.Barrier(2, timeout=30)

    def work(x: int) -> int:
        nonlocal started, most_ahead
        with lock:
            started += 1
            most_ahead = max(most_ahead, started - taken)
        if x < 2:
            both.wait()  # items 0 and 1 run at the same time, or this times out
        time.sleep(0.002)
        return x * 3

    got = []
    for value in hashio.ahead(work, range(20), cost=lambda x: 10, budget=30):
        with lock:
            taken += 1
        got.append(value)
        time.sleep(0.005)  # the caller works: the helpers run ahead, up to the budget
    assert got == [x * 3 for x in range(20)]
    assert most_ahead <= 3 + 1  # the ahead budget, plus the one being handed over
    assert most_ahead >= 3  # they did run ahead
    # an item costing more than the whole budget still runs, one at a time
    assert list(hashio.ahead(lambda x: x, range(4), cost=lambda x: 100, budget=30)) == [0, 1, 2, 3]


def test_a_read_ahead_thread_hashes_inline_to_the_same_digest() -> None:
    """On the read-ahead threads `read_hashing` hashes each piece itself: same bytes,
    same digest as the hashing threads give."""
    blob = os.urandom(3 * hashio.INLINE_CHUNK + 777)

    def read(_: int) -> tuple[bytes, str, bool]:
        src = io.BytesIO(blob)
        target = memoryview(bytearray(len(blob)))
        digest = hashlib.sha256()
        n = hashio.read_hashing(src.readinto, target, [digest])
        assert n == len(blob)
        return bytes(target), digest.hexdigest(), getattr(hashio._local, "inline", False)

    [(data, hexdigest, inline)] = list(hashio.ahead(read, [0]))
    assert inline and data == blob and hexdigest == hashlib.sha256(blob).hexdigest()
    # on the caller's thread the hashing threads do it: the same digest
    assert read(0)[1:] == (hexdigest, False)
