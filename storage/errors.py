"""Errors of the artifact store.

They derive from `randes.errors.RandesError`, so the command line reports every one
of them as a single line. A sha256 mismatch on read is not here: it is the core's
`randes.errors.IntegrityError`, whatever layer notices it, so callers catch one class
for "stored bytes are damaged" whether a cache, a bundle reader or the store found it.

Messages name the store URL, the key and the endpoint, never credentials: they end
up in logs, Prefect run states and bug reports.
"""

from __future__ import annotations

from randes.errors import RandesError


class StoreError(RandesError):
    """Base class of every failure of the artifact store."""


class ObjectNotFoundError(StoreError):
    """The key does not exist in the store."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached, or transient errors persisted through every retry.

    The condition is expected to be temporary (server restarting, network blip), so a
    flow may retry the whole task later; the message names the endpoint.
    """


class DiskFullError(StoreError):
    """A local write failed for lack of space (ENOSPC), quota (EDQUOT) or a file-size
    limit (EFBIG): the local store, the cache, a work directory or a pull/materialize
    destination. Whatever was half-written is removed; free space and run it again."""


class InvalidKeyError(StoreError, ValueError):
    """A key that could escape the store root or that some backend cannot represent.

    Also a `ValueError`: passing such a key is a caller's bug as much as bad input.
    """


class InvalidStoreUrlError(StoreError, ValueError):
    """A store URL that is neither ``file:///abs/dir`` nor ``s3://bucket[/prefix]``."""
