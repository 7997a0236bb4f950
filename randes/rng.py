"""Stable randomness: every random draw of RanDeS, as a pure function of (seed, name).

A stored superposition is only readable if the maps that built it can be drawn again,
in another process, on another machine, years later. Python's ``hash()`` is salted per
process and torch / numpy generator streams are not promised stable across versions
or devices, so none of them is used. Every draw here comes from SHAKE-256 (an
extendable-output function from the standard library) over a domain-separated key::

    b"randes/v1/" + domain + b"/" + seed (8 bytes big-endian) + name (UTF-8)

The seed has a fixed width and the domain a fixed spelling, so distinct
(domain, seed, name) triples never share a key. Domains: ``sign`` (column signs, and
element signs of rank-1 tensors under the column and two-sided maps), ``rowsign`` (row
signs of the two-sided map), ``esign/<chunk index, 8 bytes big-endian>`` (the elementwise
map, one key per chunk of ELEMENT_CHUNK elements), ``perm`` (layer shuffling). They
differ in their first byte, and the chunk index has a fixed width, so keys stay distinct.
Changing anything here changes every stored bundle: treat this file as part of the on-disk format.
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


def row_sign_vector(seed: int, name: str, n: int) -> torch.Tensor:
    """float32 +1/-1 vector of length ``n`` for the ROWS of tensor ``name`` (two-sided map).

    Same bit layout as sign_vector, drawn from its own domain (``rowsign``), so a
    tensor's row signs are independent of its column signs.
    """
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    return _signs_of(random_bytes(b"rowsign", seed, name, (n + 7) // 8), n)


ELEMENT_CHUNK = 1 << 20
"""Elements per chunk of the elementwise sign stream (part of the on-disk format).

Chunk k of tensor ``name`` holds the signs of its flat elements [k * ELEMENT_CHUNK,
(k + 1) * ELEMENT_CHUNK), drawn from its own XOF key (the chunk index is a fixed-width
part of the domain), so any chunk can be drawn on its own: a flip streams through a
tensor holding one chunk of signs (4 MiB) at a time, and the signs are never stored."""

_BITS = torch.arange(8, dtype=torch.int64)
SIGN_TABLE = 1.0 - 2.0 * ((torch.arange(256, dtype=torch.int64).unsqueeze(1) >> _BITS) & 1).to(
    torch.float32
)
"""Row b: the 8 signs byte b stands for, LSB first (bit set: -1). Unpacking by table
lookup (index_select with int32 indices) is one gather per byte: 2.5x faster than
shift / mask / convert passes per bit, ~0.8 ns per element on one core."""


def _signs_of(raw: bytes, n: int) -> torch.Tensor:
    """The first ``n`` signs (float32 +1/-1) that packed bytes ``raw`` stand for."""
    octets = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int32)
    return SIGN_TABLE.index_select(0, octets).reshape(-1)[:n]


def element_sign_bytes(seed: int, name: str, chunk: int, n: int) -> bytes:
    """Packed signs (LSB first) of the ``n`` elements of chunk ``chunk`` of ``name``."""
    if not 0 <= chunk < 2**64:
        raise ValueError(f"chunk index must be in [0, 2**64), got {chunk}")
    if not 0 <= n <= ELEMENT_CHUNK:
        raise ValueError(f"a chunk holds 0..{ELEMENT_CHUNK} elements, got {n}")
    domain = b"esign/" + chunk.to_bytes(8, "big")
    return random_bytes(domain, seed, name, (n + 7) // 8)


def element_signs(seed: int, name: str, chunk: int, n: int) -> torch.Tensor:
    """float32 +1/-1 signs of the ``n`` elements of chunk ``chunk`` of tensor ``name``."""
    if n == 0:
        return torch.empty(0, dtype=torch.float32)
    return _signs_of(element_sign_bytes(seed, name, chunk, n), n)


def element_sign_vector(seed: int, name: str, n: int) -> torch.Tensor:
    """All ``n`` elementwise signs of a tensor at once (tests, small tensors): the
    concatenation of its chunks. Streaming callers use element_signs per chunk."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    parts = [
        element_signs(seed, name, k, min(ELEMENT_CHUNK, n - k * ELEMENT_CHUNK))
        for k in range(-(-n // ELEMENT_CHUNK))
    ]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.float32)


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
