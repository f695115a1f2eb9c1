"""``deltaexit support-matrix``: which architectures collect, lens-exactly and generate."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("support-matrix", help="write the architecture support matrix")
    parser.add_argument("--out", default=None, help="markdown file to write (default: print to stdout)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it goes to stderr)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltaexit.support import support_matrix_markdown

    text = support_matrix_markdown(out=args.out, progress=not args.quiet)
    if args.out:
        from deltaexit.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
