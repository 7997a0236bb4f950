"""``python -m benchmarks {list,run,report}``: see benchmarks.runner and benchmarks.report."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m benchmarks list
       python -m benchmarks run SUITE [--quick] [suite options]   (run SUITE --help)
       python -m benchmarks report [--results DIR] [--out DIR]"""


def main(argv: Sequence[str]) -> int:
    from benchmarks import registry

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], list(argv[1:])
    if cmd == "list":
        for name in registry.SUITES:
            print(name)
        return 0
    if cmd == "run" and rest and not rest[0].startswith("-"):
        from benchmarks.runner import run_suite

        if rest[0] not in registry.SUITES:
            known = ", ".join(registry.SUITES)
            print(f"error: unknown suite {rest[0]!r}; known: {known}", file=sys.stderr)
            return 2
        run_suite(rest[0], rest[1:])
        return 0
    if cmd == "report":
        from benchmarks.report import main as report_main

        return report_main(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
