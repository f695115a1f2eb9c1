"""The ``deltaexit`` command-line tool.

Each sub-command lives in its own module under :mod:`deltaexit.commands` and exposes
``register(subparsers)``, which adds its parser and sets ``func``. Only the module of the
sub-command being run is imported and registered; the others get a one-line stub parser
from :data:`COMMANDS`, so ``deltaexit --help`` imports neither torch nor transformers.

Example:
    >>> parser = build_parser(commands=())   # stubs only: imports no command module
    >>> "support-matrix" in parser.format_help()
    True
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from deltaexit._version import __version__

# One entry per sub-command, name -> (module, one-line help as the module's register() gives it).
# Keep sorted; add new commands here (tests/test_cli.py checks the help matches the module's).
COMMANDS: dict[str, tuple[str, str]] = {
    "analyze": ("deltaexit.commands.analyze", "collect, fit and evaluate every exit measure on a model and a text"),
    "collect": (
        "deltaexit.commands.collect",
        "stream residual-stream features of a corpus to sharded files (resumable, torchrun-aware)",
    ),
    "demo": ("deltaexit.commands.demo", "run the demo on the embedded reference model"),
    "generate": ("deltaexit.commands.generate", "early-exit generation with per-token exit layers"),
    "support-matrix": ("deltaexit.commands.support_matrix", "write the architecture support matrix"),
    "train": (
        "deltaexit.commands.train",
        "train a reference model (byte-level BPE + Llama) or continue one with an exit-aware recipe",
    ),
    "tune": (
        "deltaexit.commands.tune",
        "time early-exit settings on this machine and save the fastest that meets a tolerance",
    ),
}

#: The sub-command modules, in :data:`COMMANDS` order.
COMMAND_MODULES: tuple[str, ...] = tuple(module for module, _ in COMMANDS.values())


def build_parser(commands: Collection[str] | None = None) -> argparse.ArgumentParser:
    """Build the top-level parser.

    Args:
        commands: The sub-commands whose modules are imported and whose full parsers are registered; the rest
            get a stub that only lists them in ``--help``. None registers every one.
    """
    parser = argparse.ArgumentParser(
        prog="deltaexit",
        description="Token-level early exit for HuggingFace causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"deltaexit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if commands is None or name in commands:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command named on a command line (its first non-option word), or None.

    Example:
        >>> chosen_command(["demo", "--tokens", "512"]), chosen_command(["--help"])
        ('demo', None)
    """
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def join_negative_values(argv: list[str]) -> list[str]:
    """``["--threshold", "-inf"]`` -> ``["--threshold=-inf"]``: argparse reads ``-inf`` as an option otherwise.

    Example:
        >>> join_negative_values(["generate", "--threshold", "-inf", "--kv", "verify"])
        ['generate', '--threshold=-inf', '--kv', 'verify']
    """
    out: list[str] = []
    for token in argv:
        if token.lower() in ("-inf", "-infinity") and out and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    command = chosen_command(argv)
    parser = build_parser(commands=() if command is None else (command,))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, RuntimeError) as exc:  # bad input, unreadable files: one line, no traceback
        print(f"deltaexit {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
