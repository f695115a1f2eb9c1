"""``deltaexit train``: fit a byte-level BPE tokenizer and a Llama reference model, or continue a checkpoint.

Example:
    $ deltaexit train --data wikitext-2/valid.txt --out ref-v1 --steps 400
    $ deltaexit train --preset ref64-layerskip --out ref-v2
    $ deltaexit train --data valid.txt --out v2 --init ref-v1 --recipe layerskip --curriculum rotational
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# argparse defaults; a preset fills the ones the user did not give.
_DEFAULTS = {
    "vocab": 4096,
    "hidden": 64,
    "heads": 4,
    "ffn": 256,
    "layers": 8,
    "context": 256,
    "steps": 240,
    "batch_size": 8,
    "lr": 3e-3,
    "warmup": 30,
    "recipe": "plain",
    "threads": 1,
    "save_dtype": "float32",
    "arch": "llama",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from deltaexit.training.layerskip import CURRICULA, EXIT_LOSSES
    from deltaexit.training.model_config import ARCHS, PRESETS

    parser = subparsers.add_parser(
        "train",
        help="train a reference model (byte-level BPE + Llama) or continue one with an exit-aware recipe",
        description="Fit a byte-level BPE tokenizer and a Llama-architecture causal LM on a text file "
        "(one paragraph a line) and save a normal HF directory; or continue any HF causal LM (--init) "
        "with the LayerSkip recipe.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="training text, one paragraph a line (e.g. WikiText-2 valid.txt: see docs/reference-models.md)",
    )
    parser.add_argument("--out", type=Path, required=True, help="output model directory (replaced atomically)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="named settings; explicit flags override")
    parser.add_argument("--init", type=Path, help="continue from this HF model directory (keeps its tokenizer)")
    shape = parser.add_argument_group("model shape (ignored with --init)")
    shape.add_argument("--arch", choices=ARCHS, help="model architecture (default llama)")
    shape.add_argument("--vocab", type=int, help="tokenizer vocabulary size (default 4096)")
    shape.add_argument("--hidden", type=int, help="hidden size (default 64)")
    shape.add_argument("--heads", type=int, help="attention heads (default 4)")
    shape.add_argument("--ffn", type=int, help="MLP intermediate size (default 256)")
    shape.add_argument("--layers", type=int, help="decoder blocks (default 8)")
    shape.add_argument("--context", type=int, help="training window / max positions (default 256)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, help="optimiser steps (default 240)")
    opt.add_argument("--minutes", type=float, help="also stop after this many minutes (not reproducible)")
    opt.add_argument("--batch-size", type=int, help="windows per step (default 8)")
    opt.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    opt.add_argument("--warmup", type=int, help="warm-up steps (default 30)")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument(
        "--threads",
        type=int,
        help="torch threads (default 1, or the preset's; bit-identical results for a fixed count)",
    )
    rec = parser.add_argument_group("recipe")
    rec.add_argument("--recipe", choices=["plain", "layerskip"], help="training recipe (default plain)")
    rec.add_argument("--p-max", type=float, default=0.1, help="layer dropout of the last block (layerskip)")
    rec.add_argument("--exit-loss", choices=EXIT_LOSSES, default="layerskip", help="early-exit loss weighting")
    rec.add_argument("--curriculum", choices=CURRICULA, default="rotational", help="early-exit loss curriculum")
    rec.add_argument("--exit-scale", type=float, default=1.0, help="early-exit loss scale of non-final layers")
    rec.add_argument("--rotation", type=int, default=2, help="period of the rotational curriculum")
    rec.add_argument("--dropout-warmup", choices=["none", "exp"], default="none")
    opt.add_argument(
        "--save-dtype",
        choices=["float32", "bfloat16", "float16"],
        help="storage dtype of the saved weights (default float32; loading upcasts; the perplexity is the saved one's)",
    )
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--eval-data", type=Path, help="perplexity text (default: none, no report)")
    ev.add_argument("--eval-tokens", type=int, default=65536, help="tokens of --eval-data scored (default 65536)")
    ev.add_argument("--no-eval", action="store_true", help="skip the perplexity report")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> dict:
    """Merge defaults, the preset and explicit flags into one settings dict."""
    from deltaexit.training.model_config import PRESETS

    settings = dict(_DEFAULTS)
    if args.preset:
        settings.update(PRESETS[args.preset])
    for key in _DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    return settings


def run(args: argparse.Namespace) -> int:
    from deltaexit.threads import torch_threads
    from deltaexit.training.build import train_reference
    from deltaexit.training.recipes import get_recipe
    from deltaexit.training.trainer import TrainConfig

    s = resolve(args)
    data = args.data
    if not Path(data).is_file():
        raise FileNotFoundError(f"training data {str(data)!r} not found: pass --data FILE (one paragraph a line)")
    eval_data = None
    if not args.no_eval:
        eval_data = args.eval_data
        if eval_data is not None and not Path(eval_data).is_file():
            raise FileNotFoundError(f"--eval-data {str(eval_data)!r} not found")
    if args.eval_tokens < 2:
        raise ValueError(f"--eval-tokens must be >= 2, got {args.eval_tokens}")
    if s["recipe"] == "plain":
        recipe = get_recipe("plain")
    else:
        recipe = get_recipe(
            "layerskip",
            p_max=args.p_max,
            exit_loss=args.exit_loss,
            curriculum=args.curriculum,
            scale=args.exit_scale,
            rotation=args.rotation,
            dropout_warmup=args.dropout_warmup,
            seed=args.seed,
        )
    train = TrainConfig(
        steps=s["steps"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        warmup=min(s["warmup"], s["steps"]),
        seed=args.seed,
        minutes=args.minutes,
        threads=s["threads"],
    )
    with torch_threads(train.threads):  # the library never changes the thread count itself
        report = train_reference(
            data,
            args.out,
            vocab=s["vocab"],
            hidden=s["hidden"],
            heads=s["heads"],
            ffn=s["ffn"],
            layers=s["layers"],
            context=s["context"],
            train=train,
            recipe=recipe,
            init=args.init,
            eval_data=eval_data,
            eval_tokens=args.eval_tokens,
            progress=not args.quiet,
            save_dtype=s["save_dtype"],
            arch=s["arch"],
        )
    summary = {
        "out": str(args.out),
        "steps": report["history"]["steps"],
        "seconds": report["history"]["seconds"],
        "final_train_loss": round(report["history"]["final_loss"], 4),
        "parameters": report["parameters"],
    }
    if "eval" in report:
        summary["test_perplexity"] = round(report["eval"]["perplexity"], 3)
        summary["layer_perplexity"] = [round(x, 2) for x in report["eval"]["layer_perplexity"]]
    print(json.dumps(summary, indent=2))
    return 0
