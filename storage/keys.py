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


_PIPELINE_KEY = re.compile(
    r"^(?:objects/([0-9a-f]{2})/\1[0-9a-f]{62}|manifests/[0-9a-f]{64}\.json)$"
)


def is_pipeline_key(key: str) -> bool:
    """A key this pipeline writes (`blob_key` or `manifest_key`): the only ones `gc` may
    delete. Anything else under the store's root is someone else's and is left alone."""
    return _PIPELINE_KEY.fullmatch(key) is not None


def manifest_key(sha256: str) -> str:
    """Key of a bundle-version or base-model manifest."""
    sha = _checked(sha256)
    return f"manifests/{sha}.json"
