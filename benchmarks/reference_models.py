"""Final-layer and per-layer (exact-lens) perplexity of the reference models on WikiText-2 test.txt.

Builds the presets that are not shipped into a cache directory when ``--build`` is given (each is
``deltaexit train --preset NAME``), then scores every model on the first ``--tokens`` tokens of
``test.txt`` and prints one JSON object.

Example:
    $ python benchmarks/reference_models.py --models v1 v2                      # embedded models
    $ python benchmarks/reference_models.py --models ref256-plain ref256-layerskip --build
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltaexit.reference import available_references, build_preset, reference_path
    from deltaexit.threads import torch_threads
    from deltaexit.training import layer_perplexities, read_paragraphs
    from deltaexit.training.model_config import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["v1", "v2"], help="embedded names, presets or dirs")
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--test", type=Path, default=DATA / "test.txt")
    parser.add_argument("--train-data", type=Path, default=DATA / "valid.txt")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--build", action="store_true", help="train missing presets into the cache")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = read_paragraphs(args.test)
    results = {}
    for name in args.models:
        if name in available_references():
            path = reference_path(name)
        elif Path(name).is_dir():
            path = Path(name)
        elif args.build:
            # A preset is trained with its own thread count (bit-identical for a fixed count).
            with torch_threads(PRESETS[name].get("threads", 1)):
                path = build_preset(name, cache_dir=args.cache_dir, data=args.train_data)
        else:
            from deltaexit.reference import default_cache_dir

            path = (args.cache_dir or default_cache_dir()) / name
            if not (path / "config.json").is_file():
                raise SystemExit(f"{name}: not shipped and not built; pass --build")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        start = time.perf_counter()
        per_layer = layer_perplexities(model, tokenizer, text, max_tokens=args.tokens, progress=True)
        record = {}
        training = path / "training.json"
        if training.is_file():
            record = json.loads(training.read_text())
        results[name] = {
            "path": str(path),
            "layers": model.config.num_hidden_layers,
            "hidden": model.config.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "recipe": record.get("recipe", {}).get("name"),
            "train_steps": record.get("history", {}).get("steps"),
            "train_seconds": record.get("history", {}).get("seconds"),
            "final_perplexity": round(per_layer[-1], 3),
            "layer_perplexity": [round(x, 3) for x in per_layer],
            "eval_seconds": round(time.perf_counter() - start, 1),
        }
    names = list(results)
    pairs = {}
    for plain in names:
        if plain.endswith("plain") or plain == "v1":
            other = "v2" if plain == "v1" else plain.replace("plain", "layerskip")
            if other in results:
                a, b = results[plain], results[other]
                pairs[f"{other}/{plain}"] = {
                    "final_ppl_ratio": round(b["final_perplexity"] / a["final_perplexity"], 4),
                    "layer_ppl_ratio": [round(y / x, 4) for x, y in zip(a["layer_perplexity"], b["layer_perplexity"])],
                }
    print(json.dumps({"tokens": args.tokens, "models": results, "recipe_vs_plain": pairs}, indent=2))


if __name__ == "__main__":
    main()
