"""Train a small model with the LayerSkip recipe and compare its per-layer perplexity with plain training.

Fits a byte-level BPE tokenizer and a tiny Llama (4 blocks, hidden 32) on most of the shipped
text sample, twice from the same seed: with the plain next-token loss and with the LayerSkip
recipe (layer dropout rising with depth, plus an early-exit loss through the shared final norm
and LM head). It then prints the perplexity read off every block through the logit lens on the
held-out paragraphs: LayerSkip makes the early layers better predictors (what early exit needs)
while the last layer stays close to plain training. The sample is tiny, so the absolute numbers
are only illustrative; ``deltaexit train --preset ref64-layerskip --data valid.txt --out DIR``
trains the shipped ``v2`` on WikiText-2, and ``init=DIR`` continues any HF causal LM instead.

Run:
    python examples/05_train_layerskip.py
    python examples/05_train_layerskip.py --quick      # 20 steps (CI)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from deltaexit.samples import sample_paragraphs
from deltaexit.training import LayerSkipRecipe, PlainRecipe, TrainConfig, train_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="20 steps")
    parser.add_argument("--out", type=Path, help="also save the LayerSkip model here (an HF directory)")
    args = parser.parse_args()
    steps = 20 if args.quick else args.steps

    paragraphs = sample_paragraphs()
    cut = int(0.85 * len(paragraphs))
    with tempfile.TemporaryDirectory() as tmp:
        train_txt, eval_txt = Path(tmp, "train.txt"), Path(tmp, "eval.txt")
        train_txt.write_text("\n".join(paragraphs[:cut]) + "\n", encoding="utf-8")
        eval_txt.write_text("\n".join(paragraphs[cut:]) + "\n", encoding="utf-8")
        train = TrainConfig(steps=steps, batch_size=8, lr=5e-3, warmup=max(1, steps // 10), seed=0)
        reports = {}
        for name, recipe in (("plain", PlainRecipe()), ("layerskip", LayerSkipRecipe(p_max=0.1))):
            out = args.out if name == "layerskip" else None
            reports[name] = train_reference(
                train_txt, out, vocab=512, hidden=32, heads=2, ffn=96, layers=4, context=64,  # a tiny Llama
                train=train, recipe=recipe, eval_data=eval_txt, eval_tokens=4096, progress=False,
            )  # fmt: skip

    layers = len(reports["plain"]["eval"]["layer_perplexity"])
    print(f"per-layer perplexity on held-out paragraphs ({steps} steps, {layers} blocks)")
    print(f"{'layer':>5} {'plain':>9} {'layerskip':>9}")
    for i in range(layers):
        plain, skip = (reports[n]["eval"]["layer_perplexity"][i] for n in ("plain", "layerskip"))
        print(f"{i + 1:>5} {plain:>9.1f} {skip:>9.1f}")
    if args.out:
        print(f"saved the LayerSkip model to {args.out} (AutoModelForCausalLM.from_pretrained works on it)")


if __name__ == "__main__":
    main()
