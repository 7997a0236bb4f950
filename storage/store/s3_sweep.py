"""Clearing what S3 writers that died mid-upload left behind.

A writer killed mid-upload (SIGKILL, OOM, power loss) never aborts its multipart
upload, and the uploaded parts cost space until someone does; a bucket lifecycle rule
(AbortIncompleteMultipartUpload) is the usual remedy, `sweep_incomplete` (run by
``randes gc``) is the one that needs no bucket configuration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from functools import partial
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from storage.store.s3_errors import S3Errors, code, is_not_implemented

logger = logging.getLogger("storage.store.s3")

Attempt = Callable[[str, "str | None", Callable[[], Any]], Any]


def utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def sweep_incomplete(
    client: Any,
    bucket: str,
    prefix: str,
    errors: S3Errors,
    attempt: Attempt,
    older_than: float,
    keep: Collection[str],
) -> int:
    """Abort the multipart uploads under ``prefix`` started more than ``older_than``
    seconds ago whose key (relative to ``prefix``) is not in ``keep``; how many.

    A live writer's upload is protected by its lease (``keep``) and, without one, by
    being younger than ``older_than``. ``attempt`` runs one client call the store's
    way (botocore retries; an outage outlasting them is `StoreUnavailableError`).
    """
    root = f"{prefix}/" if prefix else ""
    cutoff = time.time() - older_than
    args: dict[str, Any] = {"Bucket": bucket, "Prefix": root}
    stale: list[tuple[str, str, str]] = []
    while True:
        try:
            page = attempt("list uploads", None, lambda: client.list_multipart_uploads(**args))
        except ClientError as exc:
            if is_not_implemented(exc):
                logger.info("%s cannot list multipart uploads; none swept", errors.endpoint)
                return 0
            raise errors.translate(exc, "list uploads", None) from exc
        except BotoCoreError as exc:
            raise errors.translate(exc, "list uploads", None) from exc
        for upload in page.get("Uploads", []):
            full: str = upload["Key"]
            key = full[len(root) :] if full.startswith(root) else None
            initiated = upload.get("Initiated")
            if key is None or key in keep or initiated is None:
                continue
            if utc(initiated).timestamp() <= cutoff:
                stale.append((key, full, upload["UploadId"]))
        if not page.get("IsTruncated"):
            break
        args["KeyMarker"] = page.get("NextKeyMarker", "")
        args["UploadIdMarker"] = page.get("NextUploadIdMarker", "")
        if not args["KeyMarker"] and not args["UploadIdMarker"]:
            break
    removed = 0
    for key, full, upload_id in stale:
        try:
            attempt(
                "abort upload",
                key,
                partial(
                    client.abort_multipart_upload,
                    Bucket=bucket,
                    Key=full,
                    UploadId=upload_id,
                ),
            )
        except ClientError as exc:
            if code(exc) == "NoSuchUpload":
                continue  # completed or aborted meanwhile
            raise errors.translate(exc, "abort upload", key) from exc
        except BotoCoreError as exc:
            raise errors.translate(exc, "abort upload", key) from exc
        logger.info("aborted incomplete upload of %s", errors.where(key))
        removed += 1
    return removed
