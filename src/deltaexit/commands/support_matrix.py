"""``deltaexit support-matrix``: which causal-LM types collect, lens-exactly and generate under each KV policy."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("support-matrix", help="write the architecture support matrix")
    parser.add_argument(
        "--types", default=None, help="comma-separated model types (default: the whole causal-LM mapping)"
    )
    parser.add_argument("--out", default=None, help="markdown file to write (default: print to stdout)")
    parser.add_argument("--json", default=None, dest="json_out", help="also write the rows and summary as JSON")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one model type may take (0: no limit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (it goes to stderr)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from deltaexit.support import support_matrix_markdown

    kwargs = {
        "out": args.out,
        "json_out": args.json_out,
        "progress": not args.quiet,
        "timeout": args.timeout or None,
    }
    if args.types:
        types = [t.strip() for t in args.types.split(",") if t.strip()]
        text = support_matrix_markdown(types, **kwargs)
    else:
        text = support_matrix_markdown(**kwargs)
    if args.out:
        from deltaexit.io import atomic_write_text

        atomic_write_text(args.out, text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
