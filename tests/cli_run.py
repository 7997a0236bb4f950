"""`randes ARGV` run in the test process with its output captured: one helper for every
test that drives the command line through `flows.cli.main` (the console script's body)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

from flows.cli import main


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli(*argv: str) -> Result:
    """``randes ARGV`` in this process, its stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return Result(code, out.getvalue(), err.getvalue())
