"""The pieces the S3 store adds around boto3's transfer manager.

boto3 (``s3transfer``) does the multipart uploads, the parallel ranged downloads and
the re-reading of a body cut mid-stream; botocore's ``standard`` mode retries each
request. What the store still needs, and what lives here:

- `attempts_for`: the store's retry budget is given in seconds (``s3_retry_seconds``)
  but botocore counts attempts; this turns one into the other with the standard
  mode's own backoff law, so the meaning "about this long" survives.
- `OrderedSink`: a download target that is *not* seekable, so the transfer manager
  hands it the bytes strictly in order (ranges still fetched in parallel); each chunk
  is hashed as it is written: verification overlaps the transfer, no second pass.
- `UploadGate`: the sha256 of a file being uploaded, computed by a thread reading the
  file while the transfer manager sends it; the store's completion hook waits for it
  and refuses to complete a multipart upload whose bytes do not match.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boto3.s3.transfer import TransferConfig
from botocore.retries import quota, standard

from randes.errors import IntegrityError

MiB = 1024 * 1024
_HASH_CHUNK = 4 * MiB

# botocore's standard mode waits rand(0, 1) * min(scale * 2**i, cap) before retry i.
_BACKOFF = standard.ExponentialBackoff
_SCALE = float(getattr(_BACKOFF, "_DEFAULT_BACKOFF_CONFIG", {}).get("non_throttling_base_scale", 1))
_BASE = float(getattr(_BACKOFF, "_BASE", 2))
_CAP = float(getattr(_BACKOFF, "_MAX_BACKOFF", 20))


def attempts_for(seconds: float) -> int:
    """botocore ``max_attempts`` whose expected total backoff first reaches ``seconds``.

    The waits are jittered, so this is "about ``seconds``", plus each attempt's own
    time (bounded by the connect and read timeouts). 0 means a single attempt.
    """
    attempts, waited = 1, 0.0
    while waited < seconds and attempts < 200:
        step = _SCALE * _BASE ** (attempts - 1)
        # E[min(U * step, cap)] for U uniform on [0, 1]
        waited += step / 2 if step <= _CAP else _CAP - _CAP * _CAP / (2 * step)
        attempts += 1
    return attempts


def size_retry_quota(client: Any, connections: int, attempts: int) -> bool:
    """Let each of ``connections`` concurrent requests use all its ``attempts``.

    botocore's standard mode also stops retrying once a per-client token bucket
    (500 tokens, 14 per retry) runs dry: a circuit breaker for fleets of clients,
    but for one store whose transfer manager has ten ranged GETs in flight it ends
    the wait for a server restart after a second or so. The bucket is sized here
    to the store's own budget; botocore's handler still does every retry. False
    (and botocore's default bucket) where its internals differ from the expected.
    """
    emitter = getattr(client.meta.events, "_emitter", None)
    entry = getattr(emitter, "_unique_id_handlers", {}).get("retry-config-s3") or {}
    handler = getattr(entry.get("handler"), "__self__", None)
    checker = getattr(handler, "_retry_quota", None)
    if not isinstance(checker, standard.RetryQuotaChecker):
        return False
    cost = int(getattr(checker, "_RETRY_COST", 14))
    capacity = max(quota.RetryQuota.INITIAL_CAPACITY, connections * attempts * cost)
    setattr(checker, "_quota", quota.RetryQuota(capacity))  # noqa: B010 - private, guarded
    return True


def transfer_config(part_size: int, max_concurrency: int) -> TransferConfig:
    """One part size for the multipart threshold, the parts and the download ranges.

    The classic (Python) transfer client: the CRT client sends its own requests, past
    the botocore event hooks the store's create-if-absent completion relies on.
    """
    return TransferConfig(
        multipart_threshold=part_size,
        multipart_chunksize=part_size,
        max_concurrency=max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )


class OrderedSink:
    """A write-only, non-seekable file: s3transfer then writes in order, and each chunk
    goes through ``digest`` (when given) on its way to ``write``."""

    def __init__(self, write: Callable[[bytes], Any], digest: Any | None = None) -> None:
        self._write = write
        self._digest = digest
        self.received = 0

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        if self._digest is not None:
            self._digest.update(data)
        self._write(data)
        self.received += len(data)
        return len(data)


def source_mismatch(path: Path, key: str, expected: str, actual: str) -> IntegrityError:
    return IntegrityError(
        f"file {path} does not match the sha256 given for {key!r}: expected {expected}, "
        f"got {actual}; nothing was stored"
    )


class UploadGate:
    """The sha256 of ``path`` computed in the background, checked before completion.

    ``mismatch`` builds the error raised when the file does not hash to ``expected``
    (the store words it); `verify` blocks until the hash is known.
    """

    def __init__(
        self, path: Path, expected: str, mismatch: Callable[[str], IntegrityError]
    ) -> None:
        self.path = path
        self.expected = expected
        self._mismatch = mismatch
        self._actual: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._hash, name="s3-put-hash", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            digest = hashlib.sha256()
            with open(self.path, "rb") as src:
                while chunk := src.read(_HASH_CHUNK):
                    digest.update(chunk)
            self._actual = digest.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - re-raised by verify()
            self._error = exc

    def verify(self) -> None:
        """Raise unless the file hashes to ``expected`` (or could not be read)."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._actual is not None
        if self._actual != self.expected:
            raise self._mismatch(self._actual)
