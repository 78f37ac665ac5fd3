"""Running a parsed `kiln` command: the one place that turns user errors into one line and exit 2.

Shared by kiln/entrypoints/cli.py (the `kiln` parser) and each cli_*.py subcommand module (whose
`main` builds a parser of its own, for tests), so the subcommands need not import cli.py back.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from kiln.errors import KilnError


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed command: 0 on success, 2 with one line on a user error, 130 on Ctrl-C.

    User errors are KilnError and ValueError (validation); anything else is a bug and keeps its traceback.
    """
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except (KilnError, ValueError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


def run_subcommand(register: Callable[[argparse._SubParsersAction], None], argv: list[str] | None) -> int:
    """One subcommand module's `register` on a parser of its own (its `main`, for tests), run like `kiln`."""
    parser = argparse.ArgumentParser(prog="kiln")
    register(parser.add_subparsers(dest="command", required=True))
    return run_parsed(parser.parse_args(argv))
