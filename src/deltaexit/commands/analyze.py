"""``deltaexit analyze``: every exit measure on a model directory and a text file.

Example:
    $ deltaexit analyze --model path/to/hf-model --data test.txt --tokens 65536 --label both \\
        --json results.json --plots plots/
    $ deltaexit analyze --shards feats/ --model path/to/hf-model --tokens 65536 --label both   # a collection
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from deltaexit.analysis import AnalyzeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="collect, fit and evaluate every exit measure on a model and a text",
        description=(
            "Tokenise --data with the model's tokenizer, run the model over windows, fit the trainable "
            "measures on tokens disjoint from the first --tokens test tokens, choose thresholds on a "
            "third disjoint part, and print F1 (with the trivial all-positive F1), AUROC, per-layer "
            "‖delta‖ and the oracle ceiling. With --shards DIR instead of --data, read a deltaexit collect "
            "directory shard by shard (bounded memory) and print the same tables."
        ),
    )
    parser.add_argument(
        "--model",
        default=None,
        help=(
            "HF model directory (model + tokenizer files) or a shipped reference name; required with --data, "
            "optional with --shards (then checked against the collection; needed for lens measures and the cost table)"
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="UTF-8 text file; its first --tokens tokens are scored")
    source.add_argument(
        "--shards",
        metavar="DIR",
        help=(
            "a complete deltaexit collect --out directory: read shard by shard with bounded memory; test = the first "
            "windows holding --tokens tokens, fit = the rest (or --fit-tokens); AUROC/AUPRC from score histograms, "
            "each with its error bound"
        ),
    )
    parser.add_argument(
        "--verify", action="store_true", help="with --shards: check every shard's sha256 before any work"
    )
    parser.add_argument(
        "--histogram-bits", type=int, default=8,
        help="with --shards: mantissa bits per score bin (relative bin width 2^-bits; 23 = exact float32)",
    )  # fmt: skip
    parser.add_argument("--tokens", type=int, default=65536, help="test tokens (default 65536)")
    parser.add_argument("--fit-data", default=None, help="text file to fit on (default: --data after the test tokens)")
    parser.add_argument("--fit-tokens", type=int, default=None, help="fit tokens (default: --tokens)")
    parser.add_argument(
        "--label",
        choices=["next", "final", "kept", "both", "all"],
        default="next",
        help=(
            "next: after block l, will block l+1 keep the top-1; final: is the top-1 already final; "
            "kept: did block l keep the top-1, scored from block l's own delta (the research note's protocol); "
            "both = next + final; all = the three"
        ),
    )
    parser.add_argument("--measures", default=None, help="comma-separated display names (default: all)")
    parser.add_argument("--window", type=int, default=None, help="tokens per window (default min(256, context))")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward")
    parser.add_argument("--json", default=None, help="write every figure to this JSON file")
    parser.add_argument("--plots", default=None, help="write PNG plots into this directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 is fastest for small models on a busy machine)",
    )
    parser.add_argument(
        "--save-measures",
        default=None,
        help=(
            "save every fitted measure into DIR/<label>/<name>, with characters other than A-Za-z0-9_.- in the "
            "name written as _ (delta-mlp/per-layer -> delta-mlp_per-layer); each saved path is printed, "
            "ready for deltaexit generate --measure"
        ),
    )
    parser.add_argument(
        "--candidates", type=int, nargs="+", default=None, metavar="K",
        help="also evaluate softmax-max/-gap and lens-mlp on K candidate tokens (rows NAME@K), e.g. 64",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def _read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {path} is empty: pass a file with some text in it")
    return text


def build_config(args: argparse.Namespace) -> AnalyzeConfig:
    """The :class:`~deltaexit.analysis.AnalyzeConfig` the flags ask for."""
    from deltaexit.analysis import AnalyzeConfig

    labels = {"both": ["next", "final"], "all": ["next", "final", "kept"]}.get(args.label, [args.label])
    measures = [m.strip() for m in args.measures.split(",") if m.strip()] if args.measures else None
    return AnalyzeConfig(
        tokens=args.tokens,
        fit_tokens=args.fit_tokens,
        labels=labels,
        measures=measures,
        window=args.window,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
        save_measures=args.save_measures,
        candidates=getattr(args, "candidates", None),
    )


def run(args: argparse.Namespace) -> int:
    from deltaexit.analysis import analyze
    from deltaexit.commands.common import load_model_and_tokenizer
    from deltaexit.threads import torch_threads

    if args.tokens < 2:
        raise ValueError(f"--tokens must be >= 2, got {args.tokens}")
    config = build_config(args)
    if args.shards:
        if args.fit_data:
            raise ValueError("--fit-data reads a text; with --shards the fit tokens are the collection's later windows")
        return run_shards(args, config)
    if args.model is None:
        raise ValueError("--data needs --model (the model to run over the text)")
    text = _read_text(args.data)
    fit_text = _read_text(args.fit_data) if args.fit_data else None
    model, tokenizer = load_model_and_tokenizer(args.model)
    with torch_threads(args.threads):
        result = analyze(model, tokenizer, text, config, fit_text=fit_text)
    result["config"]["model_dir"] = str(args.model)
    result["config"]["data"] = str(args.data)
    write_outputs(args, result)
    return 0


def run_shards(args: argparse.Namespace, config: AnalyzeConfig) -> int:
    """``deltaexit analyze --shards DIR``: the same tables from a streamed collection."""
    from deltaexit.stream_analysis import analyze_shards
    from deltaexit.threads import torch_threads

    model = None
    if args.model is not None:
        from deltaexit.commands.common import load_model_and_tokenizer

        model, _ = load_model_and_tokenizer(args.model)
    with torch_threads(args.threads):
        result = analyze_shards(args.shards, config, model=model, mantissa_bits=args.histogram_bits, verify=args.verify)
    result["config"]["model_dir"] = None if args.model is None else str(args.model)
    write_outputs(args, result)
    return 0


def write_outputs(args: argparse.Namespace, result: dict) -> None:
    """Print the report; write the JSON, plots and saved-measure lines the flags ask for."""
    from deltaexit.analysis import format_report, write_plots
    from deltaexit.io import atomic_write_json

    print(format_report(result))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    if args.plots:
        for path in write_plots(result, args.plots):
            print(f"wrote {path}")
    if args.save_measures:
        print_saved_measures(result)


def print_saved_measures(result: dict) -> None:
    """One line per saved measure: the directory ``deltaexit generate --measure`` takes, as written on disk."""
    for kind, ev in result["labels"].items():
        for name, path in ev.get("saved_measures", {}).items():
            hint = " --min-exit-layer 2" if kind == "kept" else ""  # kept decisions start after block 1
            print(f"saved {kind} measure {name!r}: deltaexit generate --measure {path}{hint} ...")
