"""``deltaexit tune``: time early-exit settings against ``model.generate`` here and save the fastest that meets a
tolerance (``dx.tune``).

Example:
    $ deltaexit tune --model v2 --tolerance 0 --new-tokens 64 --threads 1 --out tuned-v2.json
    $ deltaexit generate --model v2 --prompt "The city" --tuned tuned-v2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune", help="time early-exit settings on this machine and save the fastest that meets a tolerance"
    )
    parser.add_argument(
        "--model", default=None, help="local model directory or a shipped reference name (default: the newest one)"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        default=None,
        help="calibration prompts, one a line (default: the shipped WikiText sample, 12-word prompts)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="tolerated share of tokens that differ from model.generate, in [0, 1) (0: identical output)",
    )
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per timed prompt")
    parser.add_argument("--out", type=Path, default=Path("tuned.json"), help="where to write the result (JSON)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing (default 1)")
    parser.add_argument("--budget", type=float, default=None, help="wall-clock budget of the timing, in seconds")
    parser.add_argument("--max-candidates", type=int, default=None, help="most candidates timed (default: all)")
    parser.add_argument("--timing-prompts", type=int, default=8, help="prompts timed (the first ones)")
    parser.add_argument("--repeats", type=int, default=5, help="alternated repeats of the best few")
    parser.add_argument("--epsilon", type=float, default=0.1, help="Learn-then-Test error level (tolerance > 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def read_prompts(path: Path | None) -> list[str]:
    """The non-empty lines of ``path``, or the shipped sample's prompts."""
    if path is None:
        from deltaexit.samples import sample_prompts

        return sample_prompts()
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {str(path)!r} is not a file (one prompt a line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts {str(path)!r} holds no prompt: write one prompt a line")
    return prompts


def run(args: argparse.Namespace) -> int:
    from deltaexit.commands.common import load_model_and_tokenizer
    from deltaexit.reference import available_references
    from deltaexit.threads import torch_threads
    from deltaexit.tuning.api import tune
    from deltaexit.tuning.grid import TuneConfig

    config = TuneConfig(
        tolerance=args.tolerance, max_new_tokens=args.new_tokens, budget_s=args.budget,
        max_candidates=args.max_candidates, timing_prompts=args.timing_prompts, repeats=args.repeats,
        epsilon=args.epsilon, progress=not args.no_progress,
    )  # fmt: skip
    prompts = read_prompts(args.prompts)
    known = available_references()
    if args.model is None and not known:
        raise FileNotFoundError("no shipped reference model: pass --model DIR")
    name = args.model if args.model is not None else known[-1]  # default: the newest shipped one
    model, tokenizer = load_model_and_tokenizer(name)
    with torch_threads(args.threads):
        result = tune(model, prompts, tokenizer=tokenizer, config=config)
    result.info["model"] = str(name)
    result.save(args.out)
    print(result.table())
    print(result.summary())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0
