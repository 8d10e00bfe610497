"""The `restorch` command line.

Each command group lives in its own module under `orchestrator/commands/` and exposes
`register(subparsers)`, which adds its sub-commands and sets `handler` on each; this file only
assembles them. A handler returns an exit code.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from orchestrator.commands import command_modules
from orchestrator.console import console

def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` only (fast: imports one command module), or of every command."""
    parser = argparse.ArgumentParser(
        prog="restorch",
        description="Experiment orchestration for image-restoration transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in command_modules(command):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    # Ray merges identical lines of concurrent trials ("[repeated 2x across cluster]"); the sweep's log keeps them all.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        with console.command(quiet=not getattr(args, "verbose", False)):
            return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Input problems (bad config, unknown name, missing file) are raised as ValueError /
        # FileNotFoundError with a message naming the problem and the fix: print it, no traceback.
        print(f"restorch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from workloads.storage import STORAGE_ERRNOS  # here: pyarrow is slow to import

        if err.errno not in STORAGE_ERRNOS:
            raise
        print(f"restorch {args.command}: error: {err}", file=sys.stderr)  # a full or failing disk: no traceback
        return 1


if __name__ == "__main__":
    sys.exit(main())
