"""Running a Prefect flow from the command line: a server that starts, or one error line.

With no ``PREFECT_API_URL``, Prefect starts a temporary API server in a subprocess and
waits for it ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s by default). Its
first start on a machine creates and migrates a new Prefect database: measured at 28 s
on a cold 2-core machine, so the default made the README's first command (`make demo`)
fail with a 40-line traceback. ``prefect_session`` gives the temporary server a limit
that fits such a machine (unless the user set one), keeps Prefect's console logging off
stderr, and turns "no API" into a `RandesError` that says what to do.

Prefect reads its settings once, when it is imported, so the session must be entered
before the first ``import prefect`` of the process (every flow command imports
``flows.pipeline`` inside it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from randes.errors import RandesError
from storage.redact import url_for_humans

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_STARTUP_TIMEOUT_S = 180
"""Three minutes: 6x the cold start measured on a 2-core machine, so a loaded machine
still makes it, while a server that truly cannot start (a broken Prefect install, a full
disk) is still reported within a bounded time."""

_QUIET_ENV = {
    # Read when Prefect configures logging: in this process if it is not imported yet,
    # and in the temporary API server it starts as a subprocess when none is configured.
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
    "PREFECT_LOGGING_HANDLERS_DEBUG_LEVEL": "CRITICAL",
}
_DEFAULT_ENV = {
    STARTUP_TIMEOUT_ENV: str(DEFAULT_STARTUP_TIMEOUT_S),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # DESIGN: no telemetry, no network
}

_EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"
_UNREACHABLE = "Failed to reach API at"


class PrefectUnavailableError(RandesError):
    """No Prefect API to run a flow against: the configured server is unreachable, or
    the temporary one did not come up."""


@contextlib.contextmanager
def prefect_session() -> Iterator[None]:
    """Run a flow command: start-up limit and quiet console set, API failures as one line.

    The environment is restored afterwards (tests run many commands in one process).
    """
    saved = {name: os.environ.get(name) for name in (*_QUIET_ENV, *_DEFAULT_ENV)}
    os.environ.update(_QUIET_ENV)
    for name, value in _DEFAULT_ENV.items():
        os.environ.setdefault(name, value)
    muted = _mute_prefect_console_handlers()
    try:
        yield
    except PrefectUnavailableError:
        raise
    except Exception as exc:
        unavailable = unavailable_error(exc)
        if unavailable is None:
            raise
        raise unavailable from exc
    finally:
        for handler, level in muted.items():
            handler.setLevel(level)
        for name, previous in saved.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


def check_api_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast when ``PREFECT_API_URL`` names a server that does not answer.

    For commands that do minutes of work before their first flow (`randes demo` trains
    its models first): the user learns at once, not after the training. Without a
    configured URL there is nothing to probe: the temporary server starts on demand.
    """
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except (httpx.HTTPError, ValueError) as exc:
        raise PrefectUnavailableError(
            f"cannot reach the Prefect API at {_api_url_for_humans()} ({type(exc).__name__}): "
            f"start it with `prefect server start`, or unset PREFECT_API_URL to let randes "
            f"start a temporary server"
        ) from None


def unavailable_error(exc: BaseException) -> PrefectUnavailableError | None:
    """``exc`` (or what it was raised from) as "no Prefect API", or None if it is not.

    Prefect reports both cases as bare ``RuntimeError``s (from the temporary server's
    start, and from the client's version check), and a connection refused mid-run as an
    ``httpx`` transport error; they are told apart by message and type, walking the chain
    because Prefect re-raises them wrapped.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if isinstance(current, RuntimeError) and _EPHEMERAL_TIMEOUT in text:
            return PrefectUnavailableError(
                f"Prefect's temporary API server did not start within "
                f"{os.environ.get(STARTUP_TIMEOUT_ENV, DEFAULT_STARTUP_TIMEOUT_S)} s; start a "
                f"server with `prefect server start` and set "
                f"PREFECT_API_URL=http://127.0.0.1:4200/api (or raise {STARTUP_TIMEOUT_ENV})"
            )
        if (isinstance(current, RuntimeError) and _UNREACHABLE in text) or _is_transport_error(
            current
        ):
            return PrefectUnavailableError(
                f"cannot reach the Prefect API at {_api_url_for_humans()}: start it with "
                f"`prefect server start`, or unset PREFECT_API_URL to let randes start a "
                f"temporary server"
            )
        current = current.__cause__ or current.__context__
    return None


def _is_transport_error(exc: BaseException) -> bool:
    try:
        import httpx
    except ImportError:  # pragma: no cover - Prefect depends on httpx
        return False
    return isinstance(exc, httpx.TransportError)


def _api_url_for_humans() -> str:
    """PREFECT_API_URL without any user info (a URL may carry credentials)."""
    return url_for_humans(
        os.environ.get("PREFECT_API_URL"),
        empty="the temporary server",
        unparsable="PREFECT_API_URL",
    )


def _mute_prefect_console_handlers() -> dict[logging.Handler, int]:
    """Prefect's console handlers already installed (Prefect imported before the session)
    raised above CRITICAL; returns their levels to restore. Flow and task logs still
    reach the Prefect API through its own handler, so a configured server keeps them."""
    import sys

    if "prefect" not in sys.modules:  # nothing installed yet: the env above governs
        return {}
    from prefect.logging.handlers import PrefectConsoleHandler

    muted: dict[logging.Handler, int] = {}
    loggers = [logging.getLogger()] + [
        logger
        for logger in list(logging.Logger.manager.loggerDict.values())
        if isinstance(logger, logging.Logger)
    ]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and handler not in muted:
                muted[handler] = handler.level
                handler.setLevel(logging.CRITICAL + 1)
    return muted
