"""``deltaexit generate``: early-exit generation from a local model, each token tagged with its exit layer.

Example:
    $ deltaexit generate --model ./my-model --prompt "The city" --measure delta-norm --threshold 0.9 --kv verify
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deltaexit.commands.common import DefaultsHelpFormatter


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="early-exit generation with per-token exit layers",
        description=(
            "Generate from a local model (or a shipped reference) with early exit: after each block the "
            "--measure scores the state and the token exits once the score passes --threshold. Each new token "
            "is shown with the layer it exited at: coloured from green (early) to red (full depth) on a "
            "terminal, as text[layer] otherwise (or when NO_COLOR is set), or as JSON with --json."
        ),
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="local model directory or a shipped reference name (v1, v2); no downloads"
    )
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument(
        "--measure",
        default="softmax-max",
        help="registered confidence measure name, or the directory of a fitted measure (measure.save(DIR))",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="exit when score >= threshold (inf: never exit; -inf: draft every token; default: -inf under verify, "
        "the measure's example threshold, e.g. softmax-max 0.9, under propagate/recompute)",
    )
    parser.add_argument(
        "--kv",
        default="verify",
        choices=("verify", "propagate", "recompute"),
        help="KV policy for skipped blocks: verify (lossless), propagate or recompute",
    )
    parser.add_argument("--min-exit-layer", type=int, default=1, help="first layer (1-based) a token may exit at")
    parser.add_argument(
        "--tuned", help="a `deltaexit tune --out` file: use its setting instead of --measure/--threshold/--kv"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (for --sample)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of coloured text")
    parser.set_defaults(func=run)


def _colour(layer: int, num_layers: int) -> str:
    """Green for early exits through yellow to red for full depth (ANSI 256-colour)."""
    palette = (46, 82, 118, 154, 190, 226, 220, 214, 208, 202, 196)
    frac = (layer - 1) / max(1, num_layers - 1)
    return f"\033[38;5;{palette[min(len(palette) - 1, int(frac * (len(palette) - 1) + 0.5))]}m"


def use_colour(stream: object, environ: dict[str, str] | None = None) -> bool:
    """Colour only on a terminal and only when ``NO_COLOR`` is unset or empty (https://no-color.org).

    Example:
        >>> import io
        >>> use_colour(io.StringIO(), {})
        False
    """
    import os

    env = os.environ if environ is None else environ
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not env.get("NO_COLOR")


def colour_legend(num_layers: int) -> str:
    """One line: each exit layer in its colour (printed above the coloured text).

    Example:
        >>> colour_legend(2).startswith("exit layer: ")
        True
    """
    cells = " ".join(f"{_colour(layer, num_layers)}{layer}\033[0m" for layer in range(1, num_layers + 1))
    return f"exit layer: {cells} (of {num_layers}; green = early, red = full depth)"


def check_measure_path(text: str) -> None:
    """A ``--measure`` that looks like a path but is no directory: say so, with the saved name if it exists.

    ``analyze --save-measures`` saves ``delta-mlp/per-layer`` as ``delta-mlp_per-layer`` (``io.safe_name``).
    """
    from deltaexit.io import safe_name

    path = Path(text)
    if len(path.parts) < 2:
        return
    for cut in range(len(path.parts) - 1, 0, -1):  # the display name may itself hold a "/"
        guess = Path(*path.parts[:cut]) / safe_name("/".join(path.parts[cut:]))
        if guess.is_dir():
            raise ValueError(f"--measure {text} is not a directory; the measure was saved as {guess}: pass that")
    raise ValueError(f"--measure {text} is neither a measure name nor a directory (measure.save(DIR) writes one)")


def check_fitted_layers(measure: object, min_exit_layer: int) -> None:
    """Refuse a fitted measure that cannot score every decision ``--min-exit-layer`` asks for, saying what to pass."""
    layers = getattr(measure, "layers_", None)
    if not layers:
        return
    first = min(int(layer) for layer in layers) + 1  # the 1-based exit layer of its first fitted block
    if min_exit_layer < first:
        label = getattr(measure, "label", None)
        why = f" (label {label!r} decides after blocks {first}..)" if label else ""
        raise ValueError(
            f"the measure was fitted on blocks {sorted(layers)} (0-based){why}, so it cannot score an exit after "
            f"layer {min_exit_layer}: pass --min-exit-layer {first}"
        )


def resolve_measure_arg(args: argparse.Namespace, model: Any) -> Any:
    """The measure ``--measure`` names: a saved measure directory or a registered training-free name."""
    import os

    from deltaexit.measures import get_measure, load_measure

    if os.path.isdir(args.measure):
        fitted = load_measure(args.measure, model=model)
        check_fitted_layers(fitted, args.min_exit_layer)
        return fitted
    try:
        measure = get_measure(args.measure)
    except KeyError as exc:
        check_measure_path(args.measure)
        raise ValueError(str(exc).strip('"')) from None
    if getattr(measure, "requires_fit", False):
        raise ValueError(
            f"measure {args.measure!r} must be fitted first: fit and save it (`deltaexit analyze ... "
            "--save-measures DIR`, or measure.fit(states, labels).save(DIR)) and pass --measure DIR/..."
        )
    return measure


def run(args: argparse.Namespace) -> int:
    import torch

    from deltaexit.commands.common import load_model, load_tokenizer, model_path
    from deltaexit.generation.cost import CostModel
    from deltaexit.generation.early_exit import EarlyExit
    from deltaexit.generation.outputs import EarlyExitOutput

    path = model_path(args.model)
    if not args.prompt.strip():
        raise ValueError("--prompt is empty")
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    threshold = args.threshold  # -inf (always pass: draft every token) and inf (never exit) kept as given
    measure = resolve_measure_arg(args, model)
    ee = EarlyExit(model, measure, threshold, args.kv, min_exit_layer=args.min_exit_layer)
    if args.tuned:  # the tuned setting; when plain decoding won, full depth (model.generate's output)
        from deltaexit.tuning.result import TuneResult

        ee = TuneResult.load(args.tuned).early_exit(model) or EarlyExit(model, measure, float("inf"), "verify")
    enc = tokenizer(args.prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = ee.generate(
        enc.input_ids,
        attention_mask=enc.attention_mask,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        pad_token_id=pad,
        return_dict_in_generate=True,
    )
    assert isinstance(out, EarlyExitOutput) and out.stats is not None and out.exit_layers is not None
    new = out.sequences[0, enc.input_ids.shape[1] :].tolist()
    layers = out.exit_layers[0].tolist()
    pieces = [(str(tokenizer.decode([t])), layer) for t, layer in zip(new, layers) if layer > 0]
    stats = out.stats.to_dict()
    context = (enc.input_ids.shape[1] + out.sequences.shape[1]) // 2
    flop = CostModel.from_model(model, context=context).speedup_of(out.stats) if out.stats.decode_steps else 1.0
    stats["flop_speedup"] = flop  # blocks, measure, K/V-only calls and one LM head per token (CostModel)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt": args.prompt,
                    "tokens": [{"text": s, "exit_layer": layer} for s, layer in pieces],
                    "text": "".join(s for s, _ in pieces),
                    "stats": stats,
                }
            )
        )
        return 0
    n = out.stats.num_layers
    if use_colour(sys.stdout):
        body = "".join(f"{_colour(layer, n)}{s}\033[0m" for s, layer in pieces)
        print(colour_legend(n))
        print(args.prompt + body)
    else:
        print(args.prompt + "".join(f"{s}[{layer}]" for s, layer in pieces))
    print(
        f"{out.stats.tokens} tokens, mean exit layer {out.stats.mean_exit_layer:.2f}/{n}, blocks run "
        f"{out.stats.blocks_run}/{out.stats.full_depth_blocks} (implied speed-up {out.stats.implied_speedup:.2f}x, "
        f"{flop:.2f}x counting the measure, LM head and K/V-only calls), "
        f"kv={ee.kv}, accepted drafts {out.stats.accepted}/{out.stats.drafted}, {out.stats.time_s:.2f}s"
    )
    return 0
