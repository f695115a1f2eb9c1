"""The ``deltaexit`` command-line tool.

Each sub-command lives in its own module under :mod:`deltaexit.commands` and
exposes ``register(subparsers)``, which adds its parser and sets ``func``.

Example:
    $ deltaexit demo
    $ deltaexit --help
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deltaexit._version import __version__

# One entry per sub-command module (keep sorted; add new commands here).
COMMAND_MODULES: tuple[str, ...] = (
    "deltaexit.commands.analyze",
    "deltaexit.commands.demo",
    "deltaexit.commands.generate",
    "deltaexit.commands.support_matrix",
    "deltaexit.commands.train",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="deltaexit",
        description="Token-level early exit for HuggingFace causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"deltaexit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"deltaexit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
