"""How the S3 store reads an S3 failure: transient (worth waiting out) or final.

botocore's ``standard`` retry mode does the retrying; this module only classifies
what is left once it gave up, so the store can say "unavailable" (server or network
trouble outlasting the retry budget) or quote the server's final answer (404, 403,
412, 501...), and words it (`S3Errors`) without a credential in the text.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from storage.errors import ObjectNotFoundError, StoreError, StoreUnavailableError
from storage.redact import redact_text

#: The store's logger: notices of failed attempts are part of its contract.
logger = logging.getLogger("storage.store.s3")


TRANSIENT_CODES = frozenset(
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
NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "403"}
)
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    HTTPClientError,  # connection closed, read timeouts, broken response streams
    BotoConnectionError,  # connection refused, connect timeouts, DNS
    IncompleteReadError,
    Urllib3HTTPError,  # raw urllib3 errors escaping a body read
    RetriesExceededError,  # s3transfer: a body read kept failing
    ConnectionError,
    TimeoutError,
)


def code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def transient_status(http_status: int, error_code: str = "") -> bool:
    """Whether an HTTP answer means "try again later" (501 never does)."""
    if error_code == "NotImplemented" or http_status == 501:
        return False
    return http_status >= 500 or http_status in (408, 429) or error_code in TRANSIENT_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request later may succeed (server or network trouble)."""
    if isinstance(exc, ClientError):
        return transient_status(status(exc), code(exc))
    return isinstance(exc, TRANSIENT_EXCEPTIONS)


def is_not_found(exc: ClientError) -> bool:
    return code(exc) in NOT_FOUND_CODES or status(exc) == 404


def is_precondition_failed(exc: ClientError) -> bool:
    return status(exc) == 412 or code(exc) == "PreconditionFailed"


def is_not_implemented(exc: ClientError) -> bool:
    return status(exc) == 501 or code(exc) == "NotImplemented"


class S3Errors:
    """The words of a store's failures: one clear, credential-free message each.

    Every text is built from the store URL, the key and the endpoint; a text quoted
    from botocore goes through ``scrub`` (credential values, signatures and
    ``user:password@`` removed) first.
    """

    def __init__(self, url: str, bucket: str, endpoint: str, session: Any) -> None:
        self.url = url
        self.bucket = bucket
        self.endpoint = endpoint
        self.max_attempts = 1
        self._session = session
        self._secrets: list[str] | None = None

    def where(self, key: str | None) -> str:
        target = f"{self.url}/{key}" if key else self.url
        return f"{target} (endpoint {self.endpoint})"

    def scrub(self, text: str) -> str:
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
        # botocore quotes the endpoint URL as configured, user:password@ included.
        return redact_text(text, self._secrets)

    def translate(self, exc: BaseException, what: str, key: str | None) -> StoreError:
        """The error for a failure that retrying will not fix."""
        if isinstance(exc, ClientError):
            error_code, http_status = code(exc), status(exc)
            if error_code in NOT_FOUND_CODES:
                return ObjectNotFoundError(f"no object {key!r} in {self.url}")
            if error_code == "NoSuchBucket":
                return StoreError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint}; "
                    "create it with `randes init`"
                )
            if http_status == 403 or error_code in DENIED_CODES:
                return StoreError(
                    f"{what} {self.where(key)}: access denied ({error_code or http_status}); "
                    "check the S3 credentials and the bucket policy"
                )
            message = self.scrub(str(exc.response.get("Error", {}).get("Message", "")))
            return StoreError(
                f"{what} {self.where(key)} failed: {error_code or http_status} {message}"
            )
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"no usable S3 credentials for {self.endpoint}: set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or another boto3 credential source"
            )
        return StoreError(f"{what} {self.where(key)} failed: {self.reason(exc)}")

    def reason(self, exc: BaseException) -> str:
        if isinstance(exc, ClientError):
            return f"{code(exc) or status(exc)} from server"
        return f"{type(exc).__name__}: {self.scrub(str(exc))}"

    def unavailable(
        self, exc: BaseException, what: str, key: str | None, started: float
    ) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"S3 endpoint {self.endpoint} unavailable: {what} {self.url}"
            f"{'/' + key if key else ''} still failing after {self.max_attempts} attempt(s) "
            f"over {time.monotonic() - started:.1f}s ({self.reason(exc)})"
        )

    def final(self, exc: Exception, what: str, key: str | None, started: float) -> Exception:
        """What to raise for ``exc`` once botocore stopped retrying: unavailable if
        transient, a `StoreError` for a botocore error, else ``exc`` itself."""
        if is_transient(exc):
            return self.unavailable(exc, what, key, started)
        if isinstance(exc, (ClientError, BotoCoreError)):
            return self.translate(exc, what, key)
        return exc

    def on_attempt(
        self,
        attempts: int = 0,
        caught_exception: BaseException | None = None,
        response: Any = None,
        operation: Any = None,
        **_: Any,
    ) -> None:
        """botocore ``needs-retry`` hook: log each transient failure as it happens.

        Returns None, so botocore's own retry handler alone decides (and waits).
        """
        if caught_exception is not None:
            if not isinstance(caught_exception, TRANSIENT_EXCEPTIONS):
                return
            reason = self.reason(caught_exception)
        elif response is not None:
            http, parsed = response
            error_code = str((parsed or {}).get("Error", {}).get("Code", ""))
            if http.status_code < 400 or not transient_status(http.status_code, error_code):
                return
            reason = f"{error_code or http.status_code} from server"
        else:
            return
        logger.warning(
            "S3 %s at %s: %s; attempt %d of %d",
            getattr(operation, "name", "request"),
            self.endpoint,
            reason,
            attempts,
            self.max_attempts,
        )
