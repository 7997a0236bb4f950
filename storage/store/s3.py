"""The store on any S3-compatible server (AWS, SeaweedFS, MinIO, R2...).

Transfers are boto3's (``s3transfer``: multipart uploads, parallel ranged downloads,
re-reads of a body cut mid-stream); what this module adds is what a content-addressed
store needs on top:

- **No partial or foreign object under a content-addressed key.** A large file's
  sha256 is computed by a thread reading it while the transfer manager sends it
  (`UploadGate`); a botocore hook on ``CompleteMultipartUpload`` waits for it, refuses
  to complete on a mismatch (the transfer manager then aborts the upload) and adds
  ``If-None-Match: *`` so a concurrent writer of the same key is never overwritten.
  Small objects go up with one conditional ``put_object``. Servers that reject
  conditional writes (HTTP 501) fall back to HEAD-then-PUT, safe for
  content-addressed keys because both writers hold identical bytes.
- **One retry layer.** botocore's ``standard`` mode retries each request; its
  attempt count comes from ``retry_timeout`` (seconds, `attempts_for`), so a server
  restart in the middle of a fold is waited out and a real outage surfaces as
  `StoreUnavailableError` naming the endpoint. Above that sit only Prefect's task
  retries; nothing here loops.
- **Downloads verified while they stream.** The transfer manager writes to a
  non-seekable sink (`OrderedSink`), so bytes arrive in order and are hashed as they
  are written, with the ranges still fetched in parallel; memory stays bounded by
  its in-memory chunk window.

Each failed attempt is logged at WARNING on ``storage.store.s3`` (an outage is seen as
it happens; a command line installs a handler). Credentials come from the boto3 chain
and never appear in messages (`S3Errors` words them, scrubbing botocore's texts).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar, cast

import boto3
from boto3.s3.transfer import create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.errors import (
    InvalidStoreUrlError,
    ObjectNotFoundError,
    StoreError,
)
from storage.redact import url_for_humans
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
from storage.store.s3_errors import (
    S3Errors,
    code,
    is_not_found,
    is_not_implemented,
    is_precondition_failed,
    is_transient,
    status,
)
from storage.store.s3_sweep import sweep_incomplete, utc
from storage.store.s3_transfer import (
    OrderedSink,
    UploadGate,
    attempts_for,
    size_retry_quota,
    source_mismatch,
    transfer_config,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's minimum for every part but the last


def _endpoint_for_humans(url: str | None) -> str:
    """The endpoint for messages, by storage.redact's rules (none configured: AWS S3)."""
    return url_for_humans(url, empty="AWS S3", unparsable="<unparsable endpoint URL>")


class S3Store(ObjectStore):
    """Objects under ``s3://bucket/prefix``.

    ``part_size`` is the multipart threshold, the part size and the unit of parallel
    ranged downloads; ``max_concurrency`` the transfer manager's threads per
    transfer. ``retry_timeout`` is about how long one request keeps retrying
    transient failures (botocore's standard mode, see `attempts_for`); setting it
    later rebuilds the client. ``addressing_style`` defaults to path-style when an
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
        max_concurrency: int = 10,
        retry_timeout: float = 30.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        addressing_style: str | None = None,
        durable_downloads: bool = False,
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
        self.durable_downloads = durable_downloads
        self._transfer_config = transfer_config(part_size, max_concurrency)
        self._session: Any = boto3.session.Session(region_name=region)
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region or self._session.region_name or "us-east-1",
        }
        self._config_args: dict[str, Any] = {
            "s3": {"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "max_pool_connections": max(10, 2 * max_concurrency + 2),
            "tcp_keepalive": True,
        }
        # None: unknown yet; False: the server answered 501 to a conditional write.
        self._conditional: bool | None = None
        self._gates: dict[str, UploadGate] = {}  # full key -> hash of its upload in flight
        self._key_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._errors = S3Errors(self.url, bucket, _endpoint_for_humans(endpoint_url), self._session)
        self.retry_timeout = retry_timeout  # builds the client
        self.endpoint = self._errors.endpoint = _endpoint_for_humans(
            endpoint_url or self._client.meta.endpoint_url
        )

    @property
    def retry_timeout(self) -> float:
        return self._retry_timeout

    @retry_timeout.setter
    def retry_timeout(self, seconds: float) -> None:
        self._retry_timeout = seconds
        self._errors.max_attempts = attempts = attempts_for(seconds)
        # total_max_attempts counts the first request; botocore's older max_attempts
        # counts retries only (one more request than the budget and the log say).
        config = Config(
            retries={"mode": "standard", "total_max_attempts": attempts}, **self._config_args
        )
        try:
            client: Any = self._session.client("s3", config=config, **self._client_args)
        except ValueError:  # botocore: "Invalid endpoint: ..." (it would quote secrets)
            raise InvalidStoreUrlError(
                "invalid S3 endpoint URL "
                f"{_endpoint_for_humans(self._client_args['endpoint_url'])!r} "
                "(RANDES_S3_ENDPOINT_URL): use http(s)://host[:port]"
            ) from None
        if not size_retry_quota(client, self._config_args["max_pool_connections"], attempts):
            logger.debug("botocore's retry quota left at its default")
        events = client.meta.events
        events.register("needs-retry.s3", self._errors.on_attempt)
        events.register("before-parameter-build.s3.CompleteMultipartUpload", self._before_complete)
        # Looked up at each call, so a test hook wrapping the method is seen.
        events.register("after-call.s3.UploadPart", lambda **kw: self._part_uploaded(**kw))
        self._client = client

    # ------------------------------------------------------------- plumbing
    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _attempt(self, what: str, key: str | None, call: Callable[[], T]) -> T:
        """``call`` (retried by botocore); a transient failure it could not outlast
        becomes `StoreUnavailableError`, any other error propagates unchanged so
        callers can react to specific answers (404, 412, 501)."""
        started = time.monotonic()
        try:
            return call()
        except Exception as exc:
            if is_transient(exc):
                raise self._errors.unavailable(exc, what, key, started) from exc
            raise

    def _call(self, what: str, key: str | None, call: Callable[[], T]) -> T:
        """`_attempt`, with every remaining botocore error turned into a `StoreError`."""
        try:
            return self._attempt(what, key, call)
        except (ClientError, BotoCoreError) as exc:
            raise self._errors.translate(exc, what, key) from exc

    def _fail(self, exc: Exception, what: str, key: str | None, started: float) -> NoReturn:
        """Raise what ``exc`` means once botocore (and s3transfer) stopped trying."""
        final = self._errors.final(exc, what, key, started)
        if final is exc:
            raise exc
        raise final from exc

    # ---------------------------------------------------------------- setup
    def ensure_root(self) -> None:
        try:
            self._attempt("head bucket", None, lambda: self._client.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if status(exc) != 404 and code(exc) not in ("NoSuchBucket", "404", "NotFound"):
                raise self._errors.translate(exc, "head bucket", None) from exc
        except BotoCoreError as exc:
            raise self._errors.translate(exc, "head bucket", None) from exc
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region not in ("us-east-1", "auto"):
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._attempt("create bucket", None, lambda: self._client.create_bucket(**kwargs))
        except ClientError as exc:
            if code(exc) != "BucketAlreadyOwnedByYou":
                raise self._errors.translate(exc, "create bucket", None) from exc
        except BotoCoreError as exc:
            raise self._errors.translate(exc, "create bucket", None) from exc

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
                self._attempt("put", key, lambda: self._client.put_object(IfNoneMatch="*", **args))
                self._conditional = True
                return True
            except ClientError as exc:
                if is_precondition_failed(exc):
                    self._conditional = True
                    return False
                if not is_not_implemented(exc):
                    raise self._errors.translate(exc, "put", key) from exc
                logger.info("%s rejects conditional writes; using HEAD-then-PUT", self.endpoint)
                self._conditional = False
            except BotoCoreError as exc:
                raise self._errors.translate(exc, "put", key) from exc
        if if_absent and self.exists(key):
            return False
        self._call("put", key, lambda: self._client.put_object(**args))
        return True

    def put_file(self, key: str, path: Path, *, sha256: str, move: bool = False) -> bool:
        expected = check_sha256(sha256)
        assert expected is not None
        full = self._full(key)
        path = Path(path)
        size = path.stat().st_size
        metadata = {"sha256": expected}
        if size <= self.part_size:
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise source_mismatch(path, key, expected, actual)
            return self._put_object(key, data, if_absent=True, metadata=metadata)
        # One multipart upload per key at a time in this process (the completion hook
        # finds its hash by key); a second writer then finds the key stored.
        with self._locks_guard:
            lock = self._key_locks.setdefault(full, threading.Lock())
        with lock:
            # A cheap HEAD first: re-uploading gigabytes only to have the completion
            # refused would waste the whole transfer.
            if self.exists(key):
                return False
            self._gates[full] = UploadGate(
                path, expected, lambda got: source_mismatch(path, key, expected, got)
            )
            try:
                return self._upload(key, full, path, metadata)
            finally:
                del self._gates[full]

    def _upload(self, key: str, full: str, path: Path, metadata: dict[str, str]) -> bool:
        """The transfer manager's multipart upload; True if this call stored ``key``."""
        while True:
            conditional = self._conditional is not False
            started = time.monotonic()
            try:
                with create_transfer_manager(self._client, self._transfer_config) as manager:
                    future = manager.upload(
                        str(path), self.bucket, full, extra_args={"Metadata": metadata}
                    )
                    future.result()
                return True
            except ClientError as exc:
                if conditional and is_precondition_failed(exc):
                    return False  # another writer completed the same key first
                if conditional and is_not_implemented(exc):
                    logger.info("%s rejects conditional writes; using HEAD-then-PUT", self.endpoint)
                    self._conditional = False  # the key was free a moment ago: send it again
                    continue
                if code(exc) == "NoSuchUpload" and self.exists(key):
                    return True  # an earlier attempt completed; its answer was lost in transit
                self._fail(exc, "upload", key, started)
            except Exception as exc:
                self._fail(exc, "upload", key, started)

    def _before_complete(self, params: dict[str, Any], **_: Any) -> None:
        """botocore hook on ``CompleteMultipartUpload``: the bytes sent must hash to
        the key's sha256 (else `IntegrityError`, and s3transfer aborts the upload),
        and completion only creates, never replaces, where the server allows."""
        gate = self._gates.get(str(params.get("Key")))
        if gate is not None:
            gate.verify()
        if self._conditional is not False:
            params["IfNoneMatch"] = "*"

    def _part_uploaded(self, **kwargs: Any) -> None:
        """botocore hook after each ``UploadPart`` (a kill point of the reliability tests)."""
        logger.debug("S3 part uploaded to %s", self.url)

    # ---------------------------------------------------------------- reads
    def _stream(self, key: str, write: Callable[[bytes], Any], digest: Any = None) -> int:
        """The whole object through ``write``, in order, each chunk hashed into
        ``digest`` on the way; returns the bytes delivered.

        Ranges are fetched in parallel by the transfer manager; a body cut mid-stream
        is fetched again by it, each request retried by botocore.
        """
        full = self._full(key)
        sink = OrderedSink(write, digest)
        started = time.monotonic()
        try:
            with create_transfer_manager(self._client, self._transfer_config) as manager:
                manager.download(self.bucket, full, cast(IO[bytes], sink)).result()
        except ClientError as exc:
            if is_not_found(exc):
                raise self._missing(key) from exc
            if is_precondition_failed(exc):
                raise StoreError(
                    f"object {key!r} in {self.url} changed while it was being read; try again"
                ) from exc
            self._fail(exc, "get", key, started)
        except Exception as exc:
            self._fail(exc, "get", key, started)
        return sink.received

    def _missing(self, key: str) -> StoreError:
        """A 404 to a HEAD (no body says which): no such object, or no such bucket?"""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if is_not_found(exc) or code(exc) == "NoSuchBucket":
                return self._errors.translate(
                    ClientError({"Error": {"Code": "NoSuchBucket"}}, "HeadBucket"), "get", key
                )
        except BotoCoreError:
            pass  # the object's 404 is the answer we have
        return ObjectNotFoundError(f"no object {key!r} in {self.url}")

    def get_file(self, key: str, dest: Path, *, sha256: str | None) -> None:
        expected = check_sha256(sha256)
        validate_key(key)
        dest = Path(dest)
        digest = hashlib.sha256() if expected is not None else None
        tmp = tmp_path_for(dest)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as out:
                lock_while_writing(out.fileno())
                self._stream(key, out.write, digest)
                if digest is not None and digest.hexdigest() != expected:
                    assert expected is not None
                    raise integrity_error(key, self.url, expected, digest.hexdigest())
                out.flush()  # every byte in the file before it becomes ``dest``
                if self.durable_downloads:
                    os.fsync(out.fileno())
                os.replace(tmp, dest)
        except OSError as exc:
            translated = disk_full_error(exc, f"{dest} (a copy of {self._errors.where(key)})")
            if translated is None:
                raise
            raise translated from exc
        finally:
            tmp.unlink(missing_ok=True)

    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        expected = check_sha256(sha256)
        buffer = io.BytesIO()
        digest = hashlib.sha256() if expected is not None else None
        self._stream(key, buffer.write, digest)
        if digest is not None and digest.hexdigest() != expected:
            assert expected is not None
            raise integrity_error(key, self.url, expected, digest.hexdigest())
        return buffer.getvalue()

    # ------------------------------------------------------------- metadata
    def _head(self, key: str) -> dict[str, Any] | None:
        full = self._full(key)
        try:
            response: dict[str, Any] = self._attempt(
                "head", key, lambda: self._client.head_object(Bucket=self.bucket, Key=full)
            )
            return response
        except ClientError as exc:
            if is_not_found(exc):
                return None
            raise self._errors.translate(exc, "head", key) from exc
        except BotoCoreError as exc:
            raise self._errors.translate(exc, "head", key) from exc

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        head = self._head(key)
        if head is None:
            raise ObjectNotFoundError(f"no object {key!r} in {self.url}")
        return ObjectInfo(
            key, int(head["ContentLength"]), utc(head["LastModified"]), head.get("ETag")
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
        return sweep_incomplete(
            self._client, self.bucket, self.prefix, self._errors, self._attempt, older_than, keep
        )

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
                    utc(item["LastModified"]),
                    item.get("ETag"),
                )
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            args["ContinuationToken"] = token
