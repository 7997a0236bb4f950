"""randes.hashio: hashing overlapped with reads and writes gives the plain digests."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os

import pytest

from randes import hashio


@pytest.fixture
def blob() -> bytes:
    return os.urandom(3 * hashio.CHUNK + 12345)  # chunks, and a short last one


def test_stream_hashing_feeds_every_digest_and_the_sink_in_order(blob: bytes) -> None:
    first, second = hashlib.sha256(), hashlib.sha256()
    out = io.BytesIO()
    n = hashio.stream_hashing(io.BytesIO(blob).readinto, [first, second], sink=out.write)
    assert n == len(blob) and out.getvalue() == blob
    assert first.hexdigest() == second.hexdigest() == hashlib.sha256(blob).hexdigest()


def test_stream_hashing_stops_at_the_limit_and_reports_a_short_file(blob: bytes) -> None:
    src = io.BytesIO(blob)
    digest = hashlib.sha256()
    assert hashio.stream_hashing(src.readinto, [digest], limit=hashio.CHUNK + 5) == hashio.CHUNK + 5
    assert digest.hexdigest() == hashlib.sha256(blob[: hashio.CHUNK + 5]).hexdigest()
    rest = hashlib.sha256()
    assert (
        hashio.stream_hashing(src.readinto, [rest], limit=len(blob)) == len(blob) - hashio.CHUNK - 5
    )


def test_read_hashing_fills_the_target_and_hashes_what_it_read(blob: bytes) -> None:
    target = memoryview(bytearray(len(blob)))
    digest = hashlib.sha256()
    assert hashio.read_hashing(io.BytesIO(blob).readinto, target, [digest]) == len(blob)
    assert bytes(target) == blob and digest.hexdigest() == hashlib.sha256(blob).hexdigest()
    short = memoryview(bytearray(len(blob) + 10))  # the file ends first: fewer bytes
    assert hashio.read_hashing(io.BytesIO(blob).readinto, short, [hashlib.sha256()]) == len(blob)


def test_update_while_runs_the_work_and_hashes(blob: bytes) -> None:
    digest, out = hashlib.sha256(), io.BytesIO()
    hashio.update_while([digest], memoryview(blob), lambda: out.write(blob))
    assert out.getvalue() == blob and digest.hexdigest() == hashlib.sha256(blob).hexdigest()


def _child(blob: bytes, queue: multiprocessing.Queue[str]) -> None:
    digest = hashlib.sha256()
    hashio.stream_hashing(io.BytesIO(blob).readinto, [digest])
    queue.put(digest.hexdigest())


def test_a_forked_child_gets_its_own_hashing_threads(blob: bytes) -> None:
    hashio.stream_hashing(io.BytesIO(blob).readinto, [hashlib.sha256()])  # parent's pool up
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=_child, args=(blob, queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == hashlib.sha256(blob).hexdigest()
