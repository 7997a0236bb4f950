"""The output boundary of the command line: every failure ends as one line.

Every user-facing failure is a `RandesError` and ends as one line on stderr with exit
status 1 (a malformed command line: one line, status 2); anything else is a bug and
keeps its traceback. The line is printed safely: its control characters escaped, any
configured secret replaced by ``***`` (storage.redact).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import click
import typer

from flows.console import err
from randes.errors import RandesError
from storage.redact import scrub

MAX_ERROR_CHARS = 1000

# typer >= 0.16 ships its own copy of click: its usage errors are not click's classes.
_USAGE_ERRORS: tuple[type[Exception], ...] = (click.ClickException, typer.TyperException)


def run(app: typer.Typer, argv: Sequence[str] | None) -> int:
    """``app`` on ``argv`` (default: the process's arguments) with one line per user
    error and the exit status of the contract: 0, 1 (error), 2 (usage), 3 (a failed
    validation gate), 130 (interrupted)."""
    root = logging.getLogger()
    if not root.handlers:
        # Without any handler, library warnings (an S3 retry notice per failed attempt)
        # would reach stderr through logging's last-resort handler, around the error line.
        root.addHandler(logging.NullHandler())
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        # Outside standalone mode click RETURNS the code of a `typer.Exit` (the gate's
        # exit 3 of `randes validate`) instead of raising it: pass it on.
        code = app(args=args, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code:
            return code
    except (click.exceptions.Exit, typer.Exit) as exc:
        return exc.exit_code
    except _USAGE_ERRORS as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `randes` / `randes base`: help
            exc.show()  # type: ignore[attr-defined]
            return 2
        return usage_error(exc)
    except (click.exceptions.Abort, typer.Abort):
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except RandesError as exc:
        sys.stderr.write(f"error: {error_line(str(exc)) or type(exc).__name__}\n")
        return 1
    return 0


def error_line(message: str) -> str:
    """The first line of ``message``, safe to print: no control characters, no secret.

    Messages quote user input (a path, a task name, a key from a damaged manifest): an
    escape sequence in it must not drive the terminal, and a line separator must not
    turn one error into several lines.
    """
    lines = message.strip().splitlines()
    if not lines:
        return ""
    line = "".join(_escape(ch) for ch in scrub(lines[0]))
    if len(line) > MAX_ERROR_CHARS:
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    return line


def _escape(ch: str) -> str:
    if ch.isprintable() or ch == " ":
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def usage_error(exc: Exception) -> int:
    """A bad command line as one line on stderr, like every other error (exit status 2)."""
    message = getattr(exc, "format_message", lambda: str(exc))()
    line = error_line(str(message)) or type(exc).__name__
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    sys.stderr.write(f"error: {line}{hint}\n")
    code = getattr(exc, "exit_code", 2)
    return code if isinstance(code, int) and code else 2
