"""Stable randomness: every random draw of RanDeS, as a pure function of (seed, name).

A stored superposition is only readable if the maps that built it can be drawn again,
in another process, on another machine, years later. Python's ``hash()`` is salted per
process and torch / numpy generator streams are not promised stable across versions
or devices, so none of them is used. Every draw here comes from SHAKE-256 (an
extendable-output function from the standard library) over a domain-separated key::

    b"randes/v1/" + domain + b"/" + seed (8 bytes big-endian) + name (UTF-8)

The seed has a fixed width and the domain a fixed spelling, so distinct
(domain, seed, name) triples never share a key. Changing anything here changes every
stored bundle: treat this file as part of the on-disk format.
"""

from __future__ import annotations

import hashlib
import secrets

import torch

_PREFIX = b"randes/v1/"
SEED_BITS = 63
"""Seeds are non-negative and fit a signed 64-bit SQL integer column."""


def new_task_seed() -> int:
    """A fresh, unpredictable task seed in [0, 2**63)."""
    return secrets.randbits(SEED_BITS)


def _key(domain: bytes, seed: int, name: str) -> bytes:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return _PREFIX + domain + b"/" + seed.to_bytes(8, "big") + name.encode("utf-8")


def random_bytes(domain: bytes, seed: int, name: str, n: int) -> bytes:
    """The first ``n`` bytes of the XOF stream for (domain, seed, name).

    A prefix of a longer stream equals the shorter stream (XOF property), so asking for
    more bytes later extends, never changes, what was drawn.
    """
    return hashlib.shake_256(_key(domain, seed, name)).digest(n)


def sign_vector(seed: int, name: str, n: int) -> torch.Tensor:
    """float32 vector of +1/-1 of length ``n``, fixed by (seed, name).

    Element i is -1 when bit i of the stream is set, reading bits LSB-first within
    each byte (bit i = byte[i // 8] >> (i % 8) & 1).
    """
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    raw = bytearray(random_bytes(b"sign", seed, name, (n + 7) // 8))
    octets = torch.frombuffer(raw, dtype=torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8)
    bits = ((octets.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]
    return 1.0 - 2.0 * bits.to(torch.float32)


class _WordStream:
    """Unbounded stream of 64-bit words (little-endian) from the XOF, grown on demand."""

    def __init__(self, domain: bytes, seed: int, name: str, expected_words: int) -> None:
        self._xof = hashlib.shake_256(_key(domain, seed, name))
        self._buf = b""
        self._pos = 0
        self._grow(max(expected_words, 1) * 8)

    def _grow(self, nbytes: int) -> None:
        self._buf = self._xof.digest(nbytes)

    def next(self) -> int:
        if self._pos + 8 > len(self._buf):
            self._grow(2 * len(self._buf))
        word = int.from_bytes(self._buf[self._pos : self._pos + 8], "little")
        self._pos += 8
        return word


def _uniform_below(stream: _WordStream, bound: int) -> int:
    """Exactly uniform integer in [0, bound) by rejection (no modulo bias)."""
    limit = (1 << 64) - ((1 << 64) % bound)
    while True:
        word = stream.next()
        if word < limit:
            return word % bound


def permutation(seed: int, group: str, n: int) -> list[int]:
    """A permutation of range(n), fixed by (seed, group): Fisher-Yates on XOF words.

    ``result[i]`` is where element i goes. For i = n-1 down to 1, swap position i with
    a uniform j in [0, i].
    """
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    perm = list(range(n))
    if n < 2:
        return perm
    stream = _WordStream(b"perm", seed, group, n)
    for i in range(n - 1, 0, -1):
        j = _uniform_below(stream, i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def inverse_permutation(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv
