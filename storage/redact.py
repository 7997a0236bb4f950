"""One set of rules for keeping secrets out of what the project prints and logs.

A secret can reach a message in a few shapes, and every place that prints or logs
quotes one of them: a URL's user info (``scheme://user:password@host``: for an S3
endpoint the user name is the access key id), a password-like query parameter (libpq
takes ``?password=``, presigned S3 URLs carry ``X-Amz-Signature=``), S3 request
credentials in botocore's DEBUG wire log (``Credential=AKIA.../``, the security token
header, ``<AWSAccessKeyId>``), and the literal values of the configured credentials
(the AWS variables, the database password, the endpoint's user info), raw or URL-quoted.
The rules:

- a URL shown to a person keeps scheme, host, port and path; user info, query and
  fragment are dropped (`url_for_humans`). A database URL keeps its user name and
  non-secret query (``host=`` of a socket) and shows ``***`` for the password and every
  password-like query value (`database_url_for_humans`);
- a URL that does not parse is never printed: a fixed placeholder names it instead;
- free text (a driver's or botocore's message, an error line) goes through
  `redact_text`: the given literal secrets, S3 credential fields, password-like query
  values and user info become ``***``;
- botocore's loggers get `RedactS3Credentials` (`redact_s3_debug_logs`), which applies
  `redact_text` with the configured secrets to every record.

Only the standard library at import time: the CLI's registry queries import this.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, quote_plus, unquote, urlsplit, urlunsplit

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

MASK = "***"

SECRET_KEY_SUFFIXES = (
    "password",
    "passwd",
    "pwd",
    "passfile",
    "secret",
    "secret_key",
    "secretkey",
    "token",
    "signature",
    "credential",
    "accesskeyid",
    "access_key_id",
    "apikey",
    "api_key",
)
"""A query key (or header) whose name ends so carries a secret: ``password``,
``sslpassword``, ``passfile``, ``X-Amz-Signature``, ``X-Amz-Credential``,
``X-Amz-Security-Token``, ``AWSAccessKeyId``, ``api_key``..."""

MIN_SECRET_CHARS = 4
"""Configured values shorter than this are not replaced in text: ``***`` for every
``a`` of a message would hide the message, and so short a value guards nothing."""

# scheme://userinfo@; hf:// is exempt (``hf://name@revision`` names a revision, not a
# user), and so is ``user:***@``: already redacted, as `database_url_for_humans` renders a
# database URL whose user name (a role, no secret) says which login failed.
_USERINFO = re.compile(
    r"(\b(?!hf://)[A-Za-z][A-Za-z0-9+.-]*://)(?![^/\s@\"'<>:]*:\*\*\*@)[^/\s@\"'<>]*@"
)
_SECRET_QUERY = re.compile(
    r"([?&;][A-Za-z0-9_.-]*(?:"
    + "|".join(re.escape(s) for s in SECRET_KEY_SUFFIXES)
    + r")=)[^&;\s\"'<>#]+",
    re.IGNORECASE,
)
_S3_FIELDS = (
    # SigV4 Authorization header and presigned query: Credential=AKIA.../date/region/...
    re.compile(r"((?:X-Amz-)?Credential=)[^/\s'\",&]+", re.IGNORECASE),
    # presigned query strings (X-Amz-Signature, X-Amz-Security-Token...), SigV2 fields
    re.compile(r"((?:X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId)=)[^&\s\"',]+"),
    # the security token header as botocore prints headers: 'X-Amz-Security-Token': b'...'
    re.compile(r"(X-Amz-Security-Token['\"]?\s*[:=]\s*b?['\"]?)[^'\"\s,&]+", re.IGNORECASE),
    # error bodies quoting the key id
    re.compile(r"(<AWSAccessKeyId>)[^<]+", re.IGNORECASE),
)

_AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_URL_VARIABLES = ("RANDES_S3_ENDPOINT_URL", "PREFECT_API_URL")  # user info = credentials
DATABASE_VARIABLE = "RANDES_DATABASE_URL"


def is_secret_key(name: str) -> bool:
    """Whether a query key or header name carries a secret (see SECRET_KEY_SUFFIXES)."""
    return name.lower().endswith(SECRET_KEY_SUFFIXES)


def redact_userinfo(text: str) -> str:
    """Every ``scheme://user:password@`` in ``text`` becomes ``scheme://***@``."""
    return _USERINFO.sub(rf"\1{MASK}@", text)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every literal secret of ``secrets`` (longest first), S3 credential
    field, password-like query value and URL user info replaced by ``***``."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern in _S3_FIELDS:
        text = pattern.sub(rf"\1{MASK}", text)
    text = _SECRET_QUERY.sub(rf"\1{MASK}", text)
    return redact_userinfo(text)


def url_for_humans(url: str | None, *, empty: str = "", unparsable: str = "<url>") -> str:
    """``url`` as ``scheme://host[:port]/path``: no user info, query or fragment.

    ``empty`` stands for a missing URL; ``unparsable`` for one without a scheme and a
    host, or that does not parse at all (a bad port, a broken IPv6 literal): its text
    may hold a secret in a place no rule can find, so none of it is printed.
    """
    if not url:
        return empty
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return unparsable
    if not parts.scheme or not parts.netloc:
        return unparsable
    if ":" in host:  # an IPv6 literal gets its brackets back
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def database_url_for_humans(url: str | URL, *, unparsable: str = "<database url>") -> str:
    """A database URL for printing: ``***`` for the password and for every password-like
    query value (libpq takes ``?password=``, which SQLAlchemy's ``hide_password`` leaves
    visible); the user name and other parameters stay, they say which database it is."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        hidden = {k: MASK for k in parsed.query if is_secret_key(k)}
        if hidden:
            parsed = parsed.update_query_dict(hidden)
        return parsed.render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - never print an unparsable URL, it may hold secrets
        return unparsable


def database_url_secrets(url: str | URL) -> list[str]:
    """The secrets a database URL carries: its password and password-like query values
    (an unparsable URL: none can be picked out)."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - unparsable: nothing to pick out
        return []
    found = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if is_secret_key(key):
            found.extend(str(v) for v in (value if isinstance(value, tuple) else (value,)) if v)
    return found


def _userinfo(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        info = [v for v in (parts.username, parts.password) if v]
    except ValueError:  # unparsable: nothing to pick out
        return []
    return info + [unquote(v) for v in info]


def configured_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """Secret values of this process's configuration, as they may appear in a message,
    longest first: the AWS credential variables, the user info of the S3 endpoint and
    Prefect API URLs, the database password (user info or query), each raw and
    URL-quoted (a rendered URL quotes them); values under MIN_SECRET_CHARS left out."""
    env = os.environ if environ is None else environ
    values = [env.get(name, "") for name in _AWS_VARIABLES]
    for name in _URL_VARIABLES:
        values += _userinfo(env.get(name, ""))
    database = env.get(DATABASE_VARIABLE)
    if database:
        values += database_url_secrets(database)
    values += [quote(v, safe="") for v in values] + [quote_plus(v, safe="") for v in values]
    return sorted({v for v in values if len(v) >= MIN_SECRET_CHARS}, key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` safe to print whatever layer built it: `redact_text` with the configured
    secrets (the last line of defence at the CLI's output boundary)."""
    return redact_text(text, configured_secrets())


class RedactS3Credentials(logging.Filter):
    """Hides credentials in what botocore logs at DEBUG.

    botocore's wire log (``botocore.endpoint``, "Sending http request") prints every
    request's headers, and the SigV4 ``Authorization`` header names the access key id
    (``Credential=AKIA.../...``); error bodies of some servers quote it too. Whoever
    turns DEBUG on for botocore (a handler on the root logger is enough) would copy it
    into their logs. The filter rewrites such records with `scrub`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        redacted = scrub(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


# Logger filters apply to records created at that very logger, not to its children's.
_REDACTED_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.auth",
    "botocore.hooks",
    "botocore.httpsession",
    "botocore.retryhandler",
    "botocore.credentials",
    "botocore.utils",
    "botocore.client",
)


def redact_s3_debug_logs() -> None:
    """Install `RedactS3Credentials` on botocore's loggers (idempotent)."""
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactS3Credentials) for f in logger.filters):
            logger.addFilter(RedactS3Credentials())
