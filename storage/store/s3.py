"""The store on any S3-compatible server (AWS, SeaweedFS, MinIO, R2...).

Three concerns shape this module:

- **No partial or foreign object under a content-addressed key.** Large files go up
  as multipart uploads whose parts are hashed as they are read; the upload is only
  completed if the digest matches, and completed with ``If-None-Match: *`` so a
  concurrent writer of the same key cannot be overwritten. Servers that reject
  conditional writes (HTTP 501) fall back to HEAD-then-PUT, safe for content-addressed
  keys because both writers hold identical bytes.
- **Outages are survivable.** botocore's "standard" retries handle a single glitch;
  around each call we add our own exponential backoff bounded by ``retry_timeout``
  (default 30 s), so a server restart in the middle of a fold is waited out, and a
  real outage surfaces as `StoreUnavailableError` naming the endpoint. Downloads
  resume from the last byte received instead of starting over.
- **Bounded memory whatever the object size.** Uploads hold at most
  ``max_concurrency + 1`` parts; downloads stream, with large objects fetched as
  parallel ranges written and hashed in order (same bound).

Each failed attempt that will be retried is logged at WARNING on this module's
logger (``storage.store.s3``), so callers and tests can observe an outage as it
happens; a command line should install a handler so these notices do not reach
stderr through logging's last-resort handler.

Credentials come from the normal boto3 chain and never appear in messages: every
error text is built here from the store URL, the key and the endpoint, and texts
quoted from botocore are scrubbed of the access key, secret and session token.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from randes.errors import IntegrityError
from storage.errors import (
    InvalidStoreUrlError,
    ObjectNotFoundError,
    StoreError,
    StoreUnavailableError,
)
from storage.store.base import (
    ObjectInfo,
    ObjectStore,
    check_sha256,
    disk_full_error,
    integrity_error,
    lock_while_writing,
    tmp_path_for,
    validate_key,
    validate_prefix,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's limit on parts per upload
_READ_CHUNK = 1 * MiB

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "ConditionalRequestConflict",  # AWS: a concurrent conditional write is in flight
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "403"}
)
_TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    HTTPClientError,  # connection closed, read timeouts, broken response streams
    BotoConnectionError,  # connection refused, connect timeouts, DNS
    IncompleteReadError,
    Urllib3HTTPError,  # raw urllib3 errors escaping a body read
    ConnectionError,
    TimeoutError,
)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request later may succeed (server or network trouble)."""
    if isinstance(exc, ClientError):
        code, status = _code(exc), _status(exc)
        if code == "NotImplemented" or status == 501:
            return False
        return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
    return isinstance(exc, _TRANSIENT_EXCEPTIONS)


def _is_precondition_failed(exc: ClientError) -> bool:
    return _status(exc) == 412 or _code(exc) == "PreconditionFailed"


def _is_not_implemented(exc: ClientError) -> bool:
    return _status(exc) == 501 or _code(exc) == "NotImplemented"


_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@\"'<>]*@")


def redact_userinfo(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` becomes ``scheme://***@``."""
    return _USERINFO.sub(r"\1***@", text)


def _redact_url(url: str | None) -> str:
    """The endpoint without any user:password@ part, for messages."""
    if not url:
        return "AWS S3"
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class _Backoff:
    """Exponential backoff with jitter under a time budget.

    The budget restarts whenever progress is reported, so a long download that loses
    its connection twice an hour apart gets the full budget each time.
    """

    def __init__(self, budget: float, *, base: float = 0.1, cap: float = 2.0) -> None:
        self.budget = budget
        self.base = base
        self.cap = cap
        self.attempts = 0
        self._delay = base
        self.started = self._since = time.monotonic()

    def progress(self) -> None:
        self._since = time.monotonic()
        self._delay = self.base

    def wait(self) -> bool:
        """Sleep before the next attempt; False when the budget is exhausted."""
        self.attempts += 1
        pause = self._delay * random.uniform(0.5, 1.0)
        if time.monotonic() + pause - self._since > self.budget:
            return False
        time.sleep(pause)
        self._delay = min(self._delay * 2, self.cap)
        return True

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._since


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    ``part_size`` is both the multipart threshold and part size, and the unit of
    parallel ranged downloads; memory in flight is about
    ``(max_concurrency + 1) * part_size`` per transfer. ``retry_timeout`` bounds how
    long an operation keeps retrying transient failures without progress (plus at
    most one attempt's own time). ``addressing_style`` defaults to path-style when an
    endpoint is given (what SeaweedFS, MinIO and most self-hosted servers need) and
    to boto3's choice for AWS itself.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        part_size: int = 16 * MiB,
        max_concurrency: int = 8,
        retry_timeout: float = 30.0,
        max_attempts: int = 3,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        addressing_style: str | None = None,
        durable_downloads: bool = False,
        client: Any | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise StoreError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        self.retry_timeout = retry_timeout
        self.durable_downloads = durable_downloads
        self._session: Any = None
        if client is None:
            self._session = boto3.session.Session(region_name=region)
            s3_options: Any = {
                "addressing_style": addressing_style or ("path" if endpoint_url else "auto")
            }
            config = Config(
                retries={"mode": "standard", "max_attempts": max_attempts},
                s3=s3_options,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_pool_connections=max(10, 2 * max_concurrency + 2),
                tcp_keepalive=True,
            )
            try:
                client = self._session.client(
                    "s3",
                    endpoint_url=endpoint_url,
                    region_name=region or self._session.region_name or "us-east-1",
                    config=config,
                )
            except ValueError:  # botocore: "Invalid endpoint: ..." (it would quote secrets)
                raise InvalidStoreUrlError(
                    f"invalid S3 endpoint URL {_redact_url(endpoint_url)!r} "
                    "(RANDES_S3_ENDPOINT_URL): use http(s)://host[:port]"
                ) from None
        self._client: Any = client
        self.endpoint = _redact_url(endpoint_url or client.meta.endpoint_url)
        # None: unknown yet; False: the server answered 501 to a conditional write.
        self._conditional: bool | None = None
        self._secrets: list[str] | None = None

    # ------------------------------------------------------------- plumbing
    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self, key: str | None) -> str:
        target = f"{self.url}/{key}" if key else self.url
        return f"{target} (endpoint {self.endpoint})"

    def _scrub(self, text: str) -> str:
        """Remove any credential value from a text quoted from botocore."""
        if self._secrets is None:
            secrets: list[str] = []
            try:
                creds = self._session.get_credentials() if self._session else None
                frozen = creds.get_frozen_credentials() if creds else None
                if frozen is not None:
                    secrets = [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]
            except Exception:  # noqa: BLE001 - scrubbing must never fail the caller
                secrets = []
            self._secrets = secrets
        for secret in self._secrets:
            text = text.replace(secret, "***")
        # Presigned-style query strings would carry signatures: drop them wholesale.
        text = re.sub(r"(X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId)=[^&\s\"']+", r"\1=***", text)
        # botocore quotes the endpoint URL as configured, user:password@ included.
        return redact_userinfo(text)

    def _translate(self, exc: BaseException, what: str, key: str | None) -> StoreError:
        """One clear, credential-free error for a failure that retrying will not fix."""
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _NOT_FOUND_CODES:
                return ObjectNotFoundError(f"no object {key!r} in {self.url}")
            if code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}; "
                    "create it with `randes init`"
                )
            if status == 403 or code in _DENIED_CODES:
                return StoreError(
                    f"{what} {self._where(key)}: access denied ({code or status}); "
                    "check the S3 credentials and the bucket policy"
                )
            message = self._scrub(str(exc.response.get("Error", {}).get("Message", "")))
            return StoreError(f"{what} {self._where(key)} failed: {code or status} {message}")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"no usable S3 credentials for {self.endpoint}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or another boto3 credential source"
            )
        return StoreError(f"{what} {self._where(key)} failed: {self._reason(exc)}")

    def _reason(self, exc: BaseException) -> str:
        if isinstance(exc, ClientError):
            return f"{_code(exc) or _status(exc)} from server"
        return f"{type(exc).__name__}: {self._scrub(str(exc))}"

    def _unavailable(
        self, exc: BaseException, what: str, key: str | None, backoff: _Backoff
    ) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"S3 endpoint {self.endpoint} unavailable: {what} {self.url}"
            f"{'/' + key if key else ''} still failing after {backoff.attempts} attempt(s) "
            f"over {backoff.elapsed:.1f}s ({self._reason(exc)})"
        )

    def _retry(
        self, what: str, key: str | None, call: Callable[[], T], backoff: _Backoff | None = None
    ) -> T:
        """Run ``call`` until it succeeds, retrying transient failures under the budget.

        Non-transient errors propagate unchanged so callers can react to specific
        answers (404, 412, 501); an exhausted budget raises `StoreUnavailableError`.
        """
        backoff = backoff or _Backoff(self.retry_timeout)
        while True:
            try:
                return call()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not backoff.wait():
                    raise self._unavailable(exc, what, key, backoff) from exc
                logger.warning(
                    "S3 %s %s: %s; retry %d",
                    what,
                    self._where(key),
                    self._reason(exc),
                    backoff.attempts,
                )

    def _call(self, what: str, key: str | None, call: Callable[[], T]) -> T:
        """`_retry`, with every remaining botocore error turned into a `StoreError`."""
        try:
            return self._retry(what, key, call)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, what, key) from exc

    # ---------------------------------------------------------------- setup
    def ensure_root(self) -> None:
        try:
            self._retry("head bucket", None, lambda: self._client.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if _status(exc) != 404 and _code(exc) not in ("NoSuchBucket", "404", "NotFound"):
                raise self._translate(exc, "head bucket", None) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "head bucket", None) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region not in ("us-east-1", "auto"):
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._retry("create bucket", None, lambda: self._client.create_bucket(**kwargs))
        except ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise self._translate(exc, "create bucket", None) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "create bucket", None) from exc

    # --------------------------------------------------------------- writes
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = True) -> bool:
        return self._put_object(key, bytes(data), if_absent=if_absent, metadata={})

    def _put_object(
        self, key: str, data: bytes, *, if_absent: bool, metadata: dict[str, str]
    ) -> bool:
        full = self._full(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Body": data}
        if metadata:
            args["Metadata"] = metadata
        if if_absent and self._conditional is not False:
            try:
                self._retry("put", key, lambda: self._client.put_object(IfNoneMatch="*", **args))
                self._conditional = True
                return True
            except ClientError as exc:
                if _is_precondition_failed(exc):
                    self._conditional = True
                    return False
                if not _is_not_implemented(exc):
                    raise self._translate(exc, "put", key) from exc
                logger.info("%s rejects conditional writes; using HEAD-then-PUT", self.endpoint)
                self._conditional = False
            except BotoCoreError as exc:
                raise self._translate(exc, "put", key) from exc
        if if_absent and self.exists(key):
            return False
        self._call("put", key, lambda: self._client.put_object(**args))
        return True

    def put_file(self, key: str, path: Path, *, sha256: str, move: bool = False) -> bool:
        expected = check_sha256(sha256)
        assert expected is not None
        validate_key(key)
        path = Path(path)
        size = path.stat().st_size
        metadata = {"sha256": expected}
        if size <= self.part_size:
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise _source_mismatch(path, key, expected, actual)
            return self._put_object(key, data, if_absent=True, metadata=metadata)
        # A cheap HEAD first: re-uploading gigabytes only to have the completion
        # refused would waste the whole transfer.
        if self.exists(key):
            return False
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        return self._put_multipart(key, path, expected, part_size, metadata)

    def _put_multipart(
        self, key: str, path: Path, expected: str, part_size: int, metadata: dict[str, str]
    ) -> bool:
        full = self._full(key)
        created = self._call(
            "start upload",
            key,
            lambda: self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, Metadata=metadata
            ),
        )
        upload_id: str = created["UploadId"]
        done = False
        try:
            parts: list[dict[str, Any]] = []
            digest = hashlib.sha256()
            with (
                open(path, "rb") as src,
                ThreadPoolExecutor(
                    max_workers=self.max_concurrency, thread_name_prefix="s3-put"
                ) as pool,
            ):
                inflight: deque[Future[dict[str, Any]]] = deque()
                number = 0
                while chunk := src.read(part_size):
                    digest.update(chunk)
                    number += 1
                    inflight.append(pool.submit(self._upload_part, key, upload_id, number, chunk))
                    del chunk
                    if len(inflight) >= self.max_concurrency:
                        parts.append(inflight.popleft().result())
                while inflight:
                    parts.append(inflight.popleft().result())
            actual = digest.hexdigest()
            if actual != expected:
                raise _source_mismatch(path, key, expected, actual)
            written = self._complete(key, upload_id, parts)
            done = True
            return written
        finally:
            if not done:
                self._abort(key, upload_id)

    def _upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        full = self._full(key)
        response = self._call(
            f"upload part {number}",
            key,
            lambda: self._client.upload_part(
                Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number, Body=data
            ),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _complete(self, key: str, upload_id: str, parts: list[dict[str, Any]]) -> bool:
        full = self._full(key)
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": full,
            "UploadId": upload_id,
            "MultipartUpload": {"Parts": parts},
        }
        conditional = self._conditional is not False
        try:
            if conditional:
                self._retry(
                    "complete upload",
                    key,
                    lambda: self._client.complete_multipart_upload(IfNoneMatch="*", **args),
                )
            else:
                self._retry(
                    "complete upload", key, lambda: self._client.complete_multipart_upload(**args)
                )
            return True
        except ClientError as exc:
            if conditional and _is_precondition_failed(exc):
                return False  # another writer completed the same key first
            if conditional and _is_not_implemented(exc):
                self._conditional = False
                return self._complete(key, upload_id, parts)
            if _code(exc) == "NoSuchUpload" and self.exists(key):
                # An earlier attempt completed but its answer was lost in transit.
                return True
            raise self._translate(exc, "complete upload", key) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "complete upload", key) from exc

    def _abort(self, key: str, upload_id: str) -> None:
        """Best effort: a leftover upload costs space until `sweep_incomplete` (run by
        ``randes gc``) or a bucket lifecycle rule clears it."""
        try:
            self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(key), UploadId=upload_id
            )
        except Exception as exc:  # noqa: BLE001 - never mask the original failure
            logger.warning("could not abort upload of %s: %s", self._where(key), self._reason(exc))

    # ---------------------------------------------------------------- reads
    def _stream_range(
        self,
        key: str,
        start: int,
        end: int | None,
        sink: Callable[[bytes], None],
        *,
        etag: str | None = None,
        on_response: Callable[[dict[str, Any]], None] | None = None,
        whole: bool = False,
    ) -> int:
        """Stream bytes ``[start, end]`` (``end`` inclusive, None: to the end) to ``sink``.

        A connection lost mid-body is resumed from the next byte with a new ranged
        GET (pinned to ``etag`` so a replaced object cannot be spliced in). Returns
        the number of bytes delivered. An empty range past the end delivers nothing.
        ``whole`` reads each response body in one call (bounded parts of a parallel
        download: one allocation, no re-assembly); a failed read then delivers
        nothing and the retry asks for the same range again.
        """
        full = self._full(key)
        offset = start
        backoff = _Backoff(self.retry_timeout)
        first = True
        while True:
            rng = f"bytes={offset}-" + ("" if end is None else str(end))
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": full, "Range": rng}
            if etag is not None:
                args["IfMatch"] = etag
            try:
                response = self._retry(
                    "get", key, partial(self._client.get_object, **args), backoff
                )
            except ClientError as exc:
                if _code(exc) == "InvalidRange" or _status(exc) == 416:
                    if first and offset == 0 and on_response is not None:
                        # Empty object: nothing is satisfiable; fetch it whole to learn so.
                        response = self._call(
                            "get",
                            key,
                            lambda: self._client.get_object(Bucket=self.bucket, Key=full),
                        )
                        on_response(response)
                        response["Body"].close()
                    return offset - start
                if _is_precondition_failed(exc):
                    raise StoreError(
                        f"object {key!r} in {self.url} changed while it was being read; try again"
                    ) from exc
                raise self._translate(exc, "get", key) from exc
            except BotoCoreError as exc:
                raise self._translate(exc, "get", key) from exc
            if first:
                if on_response is not None:
                    on_response(response)
                if etag is None:
                    etag = response.get("ETag")  # pin resumed reads to this version
            first = False
            body = response["Body"]
            try:
                chunks = [body.read()] if whole else body.iter_chunks(_READ_CHUNK)
                for chunk in chunks:
                    sink(chunk)
                    offset += len(chunk)
                    backoff.progress()
                return offset - start
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if not backoff.wait():
                    raise self._unavailable(exc, "get", key, backoff) from exc
                logger.warning(
                    "S3 read of %s interrupted at byte %d: %s; resuming",
                    self._where(key),
                    offset,
                    self._reason(exc),
                )
            finally:
                body.close()

    def _read_range(self, key: str, start: int, end: int, etag: str | None) -> bytes:
        pieces: list[bytes] = []
        self._stream_range(key, start, end, pieces.append, etag=etag, whole=True)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _download(self, key: str, sink: Callable[[bytes], None]) -> int:
        """Whole object to ``sink`` in order; large objects as parallel ranges.

        The first ranged GET doubles as the size probe (no HEAD round trip for the
        many small objects). As soon as its headers tell the size, the following
        parts are requested ``max_concurrency`` at a time while the first body is
        still streaming; parts are handed to ``sink`` strictly in order, so a
        streaming hash stays valid and memory stays bounded.
        """
        meta: dict[str, Any] = {}
        inflight: deque[Future[bytes]] = deque()
        pending: Iterator[int] = iter(())
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="s3-get")

        def remember(response: dict[str, Any]) -> None:
            nonlocal pending
            etag = response.get("ETag")
            content_range = response.get("ContentRange")
            total = None
            if content_range and "/" in content_range:
                tail = content_range.rsplit("/", 1)[1]
                total = int(tail) if tail.isdigit() else None
            if total is None:  # no range support: this body is the whole object
                meta["whole"] = True
                return
            meta["total"] = total
            meta["etag"] = etag
            pending = iter(range(self.part_size, total, self.part_size))
            for _ in range(self.max_concurrency):
                self._submit_range(pool, inflight, pending, key, total, etag)

        try:
            received = self._stream_range(key, 0, self.part_size - 1, sink, on_response=remember)
            if meta.get("whole") or "total" not in meta:
                return received
            total = int(meta["total"])
            while inflight:
                data = inflight.popleft().result()
                self._submit_range(pool, inflight, pending, key, total, meta["etag"])
                sink(data)
                received += len(data)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if received != total:
            raise StoreError(f"object {key!r} in {self.url}: got {received} of {total} bytes")
        return received

    def _submit_range(
        self,
        pool: ThreadPoolExecutor,
        inflight: deque[Future[bytes]],
        pending: Iterator[int],
        key: str,
        total: int,
        etag: str | None,
    ) -> None:
        start = next(pending, None)
        if start is not None:
            end = min(start + self.part_size, total) - 1
            inflight.append(pool.submit(self._read_range, key, start, end, etag))

    def get_file(self, key: str, dest: Path, *, sha256: str | None) -> None:
        expected = check_sha256(sha256)
        validate_key(key)
        dest = Path(dest)
        digest = hashlib.sha256()
        tmp = tmp_path_for(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as out:
                lock_while_writing(out.fileno())
                self._download(key, _hashing_writer(out, digest if expected else None))
                if expected is not None and digest.hexdigest() != expected:
                    raise integrity_error(key, self.url, expected, digest.hexdigest())
                if self.durable_downloads:
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
        except OSError as exc:
            translated = disk_full_error(exc, f"{dest} (a copy of {self._where(key)})")
            if translated is None:
                raise
            raise translated from exc
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        expected = check_sha256(sha256)
        buffer = io.BytesIO()
        self._download(key, _hashing_writer(buffer, None))
        data = buffer.getvalue()
        if expected is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise integrity_error(key, self.url, expected, actual)
        return data

    def get_range(self, key: str, start: int, length: int) -> bytes:
        if start < 0 or length < 0:
            raise ValueError(f"invalid range start={start} length={length}")
        if length == 0:
            self.stat(key)  # same answer as a real read for a missing key
            return b""
        return self._read_range(key, start, start + length - 1, None)

    # ------------------------------------------------------------- metadata
    def _head(self, key: str) -> dict[str, Any] | None:
        full = self._full(key)
        try:
            response: dict[str, Any] = self._retry(
                "head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
            )
            return response
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES or _status(exc) == 404:
                return None
            raise self._translate(exc, "head", key) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "head", key) from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        head = self._head(key)
        if head is None:
            raise ObjectNotFoundError(f"no object {key!r} in {self.url}")
        return ObjectInfo(
            key, int(head["ContentLength"]), _utc(head["LastModified"]), head.get("ETag")
        )

    def delete(self, key: str) -> None:
        full = self._full(key)
        with contextlib.suppress(ObjectNotFoundError):
            self._call(
                "delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full)
            )

    def sweep_incomplete(self, older_than: float, *, keep: Collection[str] = ()) -> int:
        """Abort multipart uploads under this store's prefix started more than
        ``older_than`` seconds ago whose key is not in ``keep``.

        A writer killed mid-upload (SIGKILL, OOM, power loss) never aborts its upload,
        and the uploaded parts cost space until someone does; a bucket lifecycle rule
        (AbortIncompleteMultipartUpload) is the usual remedy, this is the one that needs
        no bucket configuration. A live writer's upload is protected by its lease
        (``keep``) and, without one, by being younger than ``older_than``.
        """
        root = f"{self.prefix}/" if self.prefix else ""
        cutoff = time.time() - older_than
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": root}
        stale: list[tuple[str, str, str]] = []
        while True:
            try:
                page = self._retry(
                    "list uploads", None, lambda: self._client.list_multipart_uploads(**args)
                )
            except ClientError as exc:
                if _is_not_implemented(exc):
                    logger.info("%s cannot list multipart uploads; none swept", self.endpoint)
                    return 0
                raise self._translate(exc, "list uploads", None) from exc
            except BotoCoreError as exc:
                raise self._translate(exc, "list uploads", None) from exc
            for upload in page.get("Uploads", []):
                full: str = upload["Key"]
                key = full[len(root) :] if full.startswith(root) else None
                initiated = upload.get("Initiated")
                if key is None or key in keep or initiated is None:
                    continue
                if _utc(initiated).timestamp() <= cutoff:
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
                self._retry(
                    "abort upload",
                    key,
                    partial(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=full,
                        UploadId=upload_id,
                    ),
                )
            except ClientError as exc:
                if _code(exc) == "NoSuchUpload":
                    continue  # completed or aborted meanwhile
                raise self._translate(exc, "abort upload", key) from exc
            except BotoCoreError as exc:
                raise self._translate(exc, "abort upload", key) from exc
            logger.info("aborted incomplete upload of %s", self._where(key))
            removed += 1
        return removed

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": root + prefix}
        while True:
            page = self._call("list", prefix or None, lambda: self._client.list_objects_v2(**args))
            for item in page.get("Contents", []):
                full: str = item["Key"]
                if not full.startswith(root) or full == root or full.endswith("/"):
                    continue  # outside the root, or a console's "folder" marker
                yield ObjectInfo(
                    full[len(root) :],
                    int(item["Size"]),
                    _utc(item["LastModified"]),
                    item.get("ETag"),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            args["ContinuationToken"] = token


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _source_mismatch(path: Path, key: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"file {path} does not match the sha256 given for {key!r}: expected {expected}, "
        f"got {actual}; nothing was stored"
    )


def _hashing_writer(out: BinaryIO, digest: Any | None) -> Callable[[bytes], None]:
    """A sink writing each chunk to ``out`` and, if given, into ``digest`` as it passes."""

    def write(chunk: bytes) -> None:
        if digest is not None:
            digest.update(chunk)
        out.write(chunk)

    return write
