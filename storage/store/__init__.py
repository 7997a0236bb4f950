"""The artifact store: one interface over a local directory and S3-compatible servers.

``open_store`` turns the configured URL (``RANDES_STORE_URL``) into a backend:
``file:///abs/dir`` gives a `LocalStore` (the embedded default), ``s3://bucket[/prefix]``
an `S3Store` (with ``RANDES_S3_ENDPOINT_URL`` for SeaweedFS, MinIO, R2...).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from storage.errors import InvalidStoreUrlError
from storage.store.base import ObjectInfo, ObjectStore, validate_key, validate_prefix
from storage.store.local import LocalStore

if TYPE_CHECKING:
    from storage.store.s3 import S3Store


def __getattr__(name: str) -> Any:
    """`S3Store` on first use: boto3 (~15 MB of RSS) only where S3 is used."""
    if name != "S3Store":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module("storage.store.s3").S3Store
    globals()[name] = value
    return value


__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Store",
    "open_store",
    "validate_key",
    "validate_prefix",
]


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    retry_timeout: float | None = None,
) -> ObjectStore:
    """The store at ``url``: ``file:///abs/dir`` or ``s3://bucket[/prefix]``.

    ``endpoint_url``, ``region`` and ``retry_timeout`` (seconds an operation keeps
    retrying transient failures; default 30) only matter for S3. Credentials come from
    the normal boto3 chain, never from the URL.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidStoreUrlError(f"store URL {url!r}: file URLs must be local (file:///dir)")
        path = Path(unquote(parts.path))
        if not path.is_absolute():
            raise InvalidStoreUrlError(f"store URL {url!r}: use an absolute path (file:///dir)")
        return LocalStore(path)
    if parts.scheme == "s3":
        if parts.username or parts.password:
            # Say nothing about the value: it may be a secret.
            raise InvalidStoreUrlError(
                "s3 store URL must not carry credentials; use the boto3 credential chain"
            )
        if not parts.netloc:
            raise InvalidStoreUrlError(f"store URL {url!r}: missing bucket (s3://bucket/prefix)")
        if parts.query or parts.fragment:
            raise InvalidStoreUrlError(f"store URL {url!r}: no query or fragment allowed")
        from storage.store.s3 import S3Store

        prefix = unquote(parts.path).strip("/")
        store = S3Store(parts.netloc, prefix, endpoint_url=endpoint_url, region=region)
        if retry_timeout is not None:
            store.retry_timeout = retry_timeout
        return store
    raise InvalidStoreUrlError(
        f"unsupported store URL {url!r}: use file:///abs/dir or s3://bucket/prefix"
    )
