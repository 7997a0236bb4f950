"""Object key layout of the store.

Everything is content-addressed by sha256, manifests included: two concurrent folds
never write the same key with different bytes, so a loser of the version race leaves
only unreferenced objects behind (reclaimed by `randes gc`), never a damaged one.
"""

from __future__ import annotations

import re

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _checked(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def blob_key(sha256: str) -> str:
    """Key of a tensor shard or side file (config.json)."""
    sha = _checked(sha256)
    return f"objects/{sha[:2]}/{sha}"


def manifest_key(sha256: str) -> str:
    """Key of a bundle-version or base-model manifest."""
    sha = _checked(sha256)
    return f"manifests/{sha}.json"
