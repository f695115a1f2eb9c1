"""Candidate-set lens decisions: mean AUROC of ``NAME@K`` against the full-vocabulary measure, and their cost.

For each model (reference v2, and v3 when the package ships it) ``deltaexit.analyze`` evaluates
``softmax-max``, ``softmax-gap`` and ``lens-mlp`` over the full vocabulary and with ``candidates=K`` for each
``--candidates`` (the top-K tokens of the full lens at each token's first decision layer, only those K rows of the
head at the later ones), on the first ``--tokens`` tokens of WikiText-2 ``test.txt`` (the trainable measure fits on
the tokens after them). Prints JSON: per model and measure the mean AUROC (label ``next``), its difference from the
full measure, and the cost per decision and per token's first layer in blocks (``measure_cost`` at the window).

Usage:
    PYTHONPATH=src python benchmarks/candidates.py --json docs/results/candidates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
MEASURES = ("softmax-max", "softmax-gap", "lens-mlp")


def _default_models() -> list[str]:
    from deltaexit.reference import available_references

    names = available_references()
    return [name for name in ("v2", "v3") if name in names]


def load_model(name: str) -> tuple[Any, Any]:
    """A shipped reference (``v2``, ``v3``) or a HuggingFace model directory, in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltaexit.reference import available_references, load_reference

    if name in available_references():
        return load_reference(name)
    if not Path(name, "config.json").is_file():
        raise SystemExit(f"{name} is neither a shipped reference {available_references()} nor a model directory")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name)


def run_model(name: str, text: str, args: argparse.Namespace) -> dict[str, Any]:
    """Analyze one reference model; the rows of every measure and candidate size."""
    from deltaexit.analysis import AnalyzeConfig, analyze

    model, tokenizer = load_model(name)
    config = AnalyzeConfig(
        tokens=args.tokens, labels=(args.label,), measures=MEASURES, candidates=tuple(args.candidates),
        window=args.window, seed=args.seed, progress=args.progress,
    )  # fmt: skip
    start = time.perf_counter()
    result = analyze(model, tokenizer, text, config)
    seconds = time.perf_counter() - start
    summary = result["labels"][args.label]["summary"]
    cost = result["cost"]["measures"]
    rows = {}
    for display, figures in summary.items():
        base = display.partition("@")[0]
        rows[display] = {
            "mean_auroc": figures["mean_auroc"],
            "auroc_minus_full": figures["mean_auroc"] - summary[base]["mean_auroc"],
            "mean_f1": figures["mean_f1"],
            "blocks_per_decision": cost[display]["fraction_of_block"],
            "first_layer_extra_blocks": cost[display]["setup_fraction_of_block"],
        }
    return {
        "model": name,
        "layers": result["config"]["num_layers"],
        "hidden_size": result["config"]["hidden_size"],
        "vocab_size": result["config"]["vocab_size"],
        "tokens": result["tokens"],
        "window": result["config"]["window"],
        "label": args.label,
        "seconds": seconds,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help="reference names or model directories (default: v2 and v3 if shipped)"
    )
    parser.add_argument("--data", default=str(DATA / "test.txt"), help="UTF-8 text (default: WikiText-2 test.txt)")
    parser.add_argument("--tokens", type=int, default=16384, help="test tokens (the fit takes as many after them)")
    parser.add_argument("--candidates", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--label", default="next", choices=["next", "final", "kept"])
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args(argv)

    from deltaexit.threads import torch_threads

    text = Path(args.data).read_text(encoding="utf-8")
    models = args.models or _default_models()
    with torch_threads(args.threads):
        out = {"command": "python benchmarks/candidates.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        out["models"] = [run_model(name, text, args) for name in models]
    dumped = json.dumps(out, indent=2)
    print(dumped)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(dumped + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
