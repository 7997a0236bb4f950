"""storage.redact against every secret shape the reliability tests know.

The shapes come from tests/reliability (test_credentials, test_hostile_env), the
Prefect start test and the store/registry tests: a database password in the URL's user
info and as a ``?password=`` parameter (with '@', '%' and '/' in it, so raw and quoted
spellings differ), an S3 endpoint URL carrying ``ACCESSKEY:secret@``, the AWS credential
variables, a Prefect API URL with ``user:password@``, an ``s3://KEY:secret@bucket``
store URL, and botocore's own DEBUG wire log and presigned URLs (made here by botocore
itself, offline), plus URLs that do not parse.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config

from storage.redact import (
    RedactS3Credentials,
    configured_secrets,
    database_url_for_humans,
    database_url_secrets,
    redact_s3_debug_logs,
    redact_text,
    redact_userinfo,
    url_for_humans,
)

DB_PASSWORD = "Pg@Leak%Probe/0123abcd"  # as tests/reliability/test_credentials builds it
SOCKET = quote("/tmp/pg socket", safe="")
DB_URL = f"postgresql+psycopg://leak_role:{quote(DB_PASSWORD, safe='')}@/db_leak?host={SOCKET}"
DB_URL_QUERY = (
    f"postgresql+psycopg://leak_role@/db_leak?host={SOCKET}&password={quote(DB_PASSWORD, safe='')}"
)
ENDPOINT = "http://AKIAENDPOINTUSER:s3cr%40t-in-url@127.0.0.1:9/"
PREFECT_URL = "http://user:hunter2secret@127.0.0.1:4200/api"
ACCESS_KEY = "AKIAREDACTTEST00001"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYREDACTKEY"
SESSION_TOKEN = "FQoGZXIvYXdzEREDACT/TOKEN+VALUE=="


def _spellings(value: str) -> list[str]:
    return [value, quote(value, safe="")]


def assert_absent(text: str, *secrets: str) -> None:
    for secret in secrets:
        for spelling in _spellings(secret):
            assert spelling not in text, (spelling, text)


# ------------------------------------------------------------- database URLs
def test_database_url_password_in_the_user_info() -> None:
    shown = database_url_for_humans(DB_URL)
    assert shown.startswith("postgresql+psycopg://leak_role:***@/db_leak"), shown
    assert "host=" in shown  # the non-secret parameters still say which database
    assert_absent(shown, DB_PASSWORD)
    assert database_url_secrets(DB_URL) == [DB_PASSWORD]


@pytest.mark.parametrize("key", ["password", "PASSWORD", "sslpassword", "passfile"])
def test_database_url_password_like_query_values(key: str) -> None:
    url = DB_URL_QUERY.replace("&password=", f"&{key}=")
    shown = database_url_for_humans(url)
    assert f"{key}=%2A%2A%2A" in shown, shown  # '***', url-quoted as SQLAlchemy renders it
    assert_absent(shown, DB_PASSWORD)
    assert database_url_secrets(url) == [DB_PASSWORD]


def test_a_database_url_that_does_not_parse_is_never_printed() -> None:
    assert database_url_for_humans("not a url at all") == "<database url>"
    assert database_url_secrets("not a url at all") == []
    # parses (the driver only fails at connect): the password is still hidden
    shown = database_url_for_humans("postgresql+nosuchdriver://u:pw@h/db")
    assert shown == "postgresql+nosuchdriver://u:***@h/db"


# ---------------------------------------------------------- endpoint URLs
@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (ENDPOINT, "http://127.0.0.1:9/"),
        (PREFECT_URL, "http://127.0.0.1:4200/api"),
        ("https://s3.example.com/?X-Amz-Signature=abc#frag", "https://s3.example.com/"),
        ("http://AKIAONLYUSER@[::1]:8333/x", "http://[::1]:8333/x"),
    ],
)
def test_urls_for_humans_drop_user_info_query_and_fragment(url: str, shown: str) -> None:
    assert url_for_humans(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        "http://AKIAENDPOINTUSER:s3cr%40t@host:notaport/",  # the port does not parse
        "http://AKIAENDPOINTUSER:s3cr%40t@[::1/",  # broken IPv6 literal
        "AKIAENDPOINTUSER:s3cr%40t@host",  # no scheme://: user info would read as a path
        "garbage",
    ],
)
def test_a_url_that_does_not_parse_is_never_printed(url: str) -> None:
    assert url_for_humans(url, unparsable="RANDES_S3_ENDPOINT_URL") == "RANDES_S3_ENDPOINT_URL"


def test_a_missing_url_has_its_own_name() -> None:
    assert url_for_humans(None, empty="AWS S3") == "AWS S3"
    assert url_for_humans("", empty="the temporary server") == "the temporary server"


# ------------------------------------------------------------- free text
def test_user_info_in_any_url_of_a_text() -> None:
    text = (
        f'Could not connect to the endpoint URL: "{ENDPOINT}bucket/key"; '
        "store URL s3://AKIAEXAMPLE:hunter2@bucket/x; api "
        f"{PREFECT_URL}"
    )
    redacted = redact_userinfo(text)
    assert_absent(redacted, "AKIAENDPOINTUSER", "s3cr%40t", "AKIAEXAMPLE", "hunter2")
    assert "http://***@127.0.0.1:9/bucket/key" in redacted


def test_a_rendered_database_url_keeps_its_user_name() -> None:
    shown = database_url_for_humans(DB_URL)
    assert redact_text(f"registry database {shown} unavailable") == (
        f"registry database {shown} unavailable"
    )
    assert redact_userinfo("http://AKIAX:***x@h/") == "http://***@h/"  # not a mask: hidden


def test_hf_revisions_are_not_user_info() -> None:
    text = "hf://gpt2@main and hf://org/repo@v1.0 and https://huggingface.co/org/repo"
    assert redact_text(text) == text


def test_password_like_query_values_in_a_text() -> None:
    text = (
        'connection to "/tmp" failed: ?host=/tmp&password=Pg%40Leak&sslpassword=x1y2 '
        "https://b.s3/k?X-Amz-Security-Token=TOKEN123&api_key=KEY456&part=1"
    )
    redacted = redact_text(text)
    assert_absent(redacted, "Pg%40Leak", "x1y2", "TOKEN123", "KEY456")
    assert "host=/tmp" in redacted and "part=1" in redacted


def test_literal_secrets_longest_first() -> None:
    # the shorter secret is a prefix of the longer: replacing it first would leave a tail
    redacted = redact_text(
        "key wrong-other-secret-key here", ["other-secret", "wrong-other-secret-key"]
    )
    assert redacted == "key *** here"


# --------------------------------------------------- configured secrets
def test_configured_secrets_every_variable_raw_and_quoted() -> None:
    env = {
        "RANDES_DATABASE_URL": DB_URL,
        "RANDES_S3_ENDPOINT_URL": ENDPOINT,
        "PREFECT_API_URL": PREFECT_URL,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": SESSION_TOKEN,
    }
    found = configured_secrets(env)
    for secret in (
        DB_PASSWORD,
        "AKIAENDPOINTUSER",
        "s3cr@t-in-url",
        "hunter2secret",
        ACCESS_KEY,
        SECRET_KEY,
        SESSION_TOKEN,
    ):
        assert secret in found and quote(secret, safe="") in found, secret
    assert "s3cr%40t-in-url" in found  # as it stands in the endpoint URL
    assert found == sorted(found, key=len, reverse=True)
    message = (
        f"error: auth failed for {quote(DB_PASSWORD, safe='')} / {SESSION_TOKEN} / {SECRET_KEY}"
    )
    assert_absent(redact_text(message, found), DB_PASSWORD, SESSION_TOKEN, SECRET_KEY)


def test_configured_secrets_from_the_query_and_short_values_left_out() -> None:
    found = configured_secrets(
        {"RANDES_DATABASE_URL": DB_URL_QUERY, "AWS_SECRET_ACCESS_KEY": "abc"}
    )
    assert DB_PASSWORD in found and "abc" not in found
    assert (
        configured_secrets({"RANDES_DATABASE_URL": "not a url", "PREFECT_API_URL": "http://[::1"})
        == []
    )


# ------------------------------------------------ botocore's own output
def _client(signature_version: str | None = None) -> object:
    session = boto3.session.Session(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        aws_session_token=SESSION_TOKEN,
        region_name="us-east-1",
    )
    return session.client(
        "s3",
        endpoint_url="http://127.0.0.1:9",
        config=Config(retries={"max_attempts": 0}, signature_version=signature_version),
    )


@pytest.mark.parametrize(
    ("version", "signature"), [(None, "Signature"), ("s3v4", "X-Amz-Signature")]
)
def test_presigned_urls_lose_their_credential_signature_and_token(
    version: str | None, signature: str
) -> None:
    client = _client(version)  # botocore's default presigns SigV2: AWSAccessKeyId=, Signature=
    url = client.generate_presigned_url(  # type: ignore[attr-defined]
        "get_object", Params={"Bucket": "b", "Key": "k"}, ExpiresIn=60
    )
    value = url.split(f"{signature}=")[1].split("&")[0]
    assert ACCESS_KEY in url and quote(SESSION_TOKEN, safe="") in url
    redacted = redact_text(f"fetching {url} failed")
    assert_absent(redacted, ACCESS_KEY, SESSION_TOKEN, value)
    assert f"{signature}=***" in redacted and "http://127.0.0.1:9/b/k?" in redacted


def _signed_request_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> list[str]:
    """botocore's DEBUG log of one real signed request, the filters installed (the
    messages, logger first); the
    request is answered in process (``before-send``), so nothing leaves the machine."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    redact_s3_debug_logs()
    redact_s3_debug_logs()  # idempotent
    assert (
        sum(
            isinstance(f, RedactS3Credentials)
            for f in logging.getLogger("botocore.endpoint").filters
        )
        == 1
    )
    caplog.set_level(logging.DEBUG, logger="botocore")
    client = _client()
    body = (
        b"<Error><Code>InvalidAccessKeyId</Code>"
        b"<AWSAccessKeyId>" + ACCESS_KEY.encode() + b"</AWSAccessKeyId></Error>"
    )

    def answer(request: object, **_: object) -> AWSResponse:
        return AWSResponse("http://127.0.0.1:9/b/k", 403, {}, _Raw(body))

    client.meta.events.register("before-send.s3.GetObject", answer)  # type: ignore[attr-defined]
    with pytest.raises(client.exceptions.ClientError):  # type: ignore[attr-defined]
        client.get_object(Bucket="b", Key="k")  # type: ignore[attr-defined]
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records]


class _Raw:
    """The raw stream AWSResponse reads its body from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: object) -> object:
        yield self._data


def test_botocore_debug_log_shows_no_credential(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged = _signed_request_logged(caplog, monkeypatch)
    sent = [m for m in logged if m.startswith("botocore.endpoint: Sending http request")]
    assert sent, logged[:3]  # the wire log, with the Authorization header, was captured
    assert all("Credential=***" in m and "Signature=***" in m for m in sent), sent
    assert any("<AWSAccessKeyId>***" in m for m in logged)  # the error body, parsed
    assert_absent("\n".join(logged), ACCESS_KEY, SESSION_TOKEN, SECRET_KEY)


def test_the_log_filter_leaves_other_records_alone() -> None:
    record = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1, "Got %s", ("ok",), None
    )
    assert RedactS3Credentials().filter(record)
    assert (record.msg, record.args) == ("Got %s", ("ok",))
    leaky = logging.LogRecord(
        "botocore.endpoint", logging.DEBUG, __file__, 1, "auth %s", ("Credential=AKIAX/2026",), None
    )
    assert RedactS3Credentials().filter(leaky)
    assert leaky.getMessage() == "auth Credential=***/2026"
