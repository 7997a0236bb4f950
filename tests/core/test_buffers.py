"""randes.buffers.ByteBuffers: byte buffers lent across threads and reused."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from randes.buffers import ByteBuffers


def test_a_buffer_given_back_is_lent_again_best_fit_first() -> None:
    pool = ByteBuffers()
    small, large = pool.borrow(10_000), pool.borrow(1_000_000)
    assert small.shape[0] >= 10_000 and large.shape[0] >= 1_000_000
    pool.give_back(large)
    pool.give_back(small)
    assert pool.nbytes == small.shape[0] + large.shape[0]
    again = pool.borrow(5_000)
    assert again is small  # the smallest that fits, not the first given back
    assert pool.borrow(500_000) is large
    assert pool.nbytes == 0
    fresh = pool.borrow(2_000_000)  # none fits: a new one, the pool keeps nothing lent
    assert fresh is not large and fresh.shape[0] >= 2_000_000


def test_buffers_lent_at_once_are_distinct_from_any_thread() -> None:
    pool = ByteBuffers()

    def cycle(k: int) -> list[int]:
        held = [pool.borrow(4096 * (1 + (k + i) % 5)) for i in range(8)]
        for i, buf in enumerate(held):
            buf[:16] = k  # each holder writes its own
            assert int(buf[:16].max()) == k, i
        addresses = [buf.ctypes.data for buf in held]
        for buf in held:
            pool.give_back(buf)
        return addresses

    with ThreadPoolExecutor(4) as ex:
        for addresses in ex.map(cycle, range(64)):
            assert len(set(addresses)) == len(addresses)
    assert pool.nbytes <= 4 * 8 * 4096 * 5 * 2  # bounded by what was lent at once
