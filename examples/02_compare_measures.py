"""Compare confidence measures on your own text.

Collects every block's states of a text with the shipped reference model, fits the trainable
measures on the first windows, chooses each measure's F1 threshold on the next windows and
reports, on the held-out tail, F1 next to the trivial all-positive F1 and AUROC, for the label
"next" (the top-1 does not change at the next block). Training-free measures (softmax-max,
softmax-gap, delta-norm, ...) need no fit. ``dx.analyze`` (or ``deltaexit analyze``) does all of
this in one call; here the steps are spelled out so you can swap any of them.

Run:
    python examples/02_compare_measures.py                    # the shipped sample
    python examples/02_compare_measures.py my_text.txt        # your text (UTF-8)
    python examples/02_compare_measures.py --quick            # fewer tokens and epochs (CI)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import deltaexit as dx
from deltaexit.features import tokenize_text
from deltaexit.samples import sample_text

TRAINING_FREE = ("softmax-max", "softmax-gap", "state-cosine", "delta-norm")
TRAINABLE = {"linear": {"features": "delta"}, "delta-mlp": {}}  # registry name -> keyword arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", help="a UTF-8 text file (default: the shipped sample)")
    parser.add_argument("--model", default="v1", help="shipped reference: v1 (plain) or v2 (LayerSkip)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens used in all (fit + select + test)")
    parser.add_argument("--quick", action="store_true", help="1,536 tokens, 5 epochs")
    args = parser.parse_args()
    tokens, epochs = (1536, 5) if args.quick else (args.tokens, 30)

    model, tokenizer = dx.load_reference(args.model)
    text = Path(args.text).read_text(encoding="utf-8") if args.text else sample_text()
    ids = tokenize_text(tokenizer, text, max_tokens=tokens)
    states = dx.collect_states(model, ids, window=128)  # every block's h_in/h_out and lens top-k
    fit, select, test = states.split_windows([0.5, 0.2, 0.3])  # disjoint windows
    print(f"{states.num_tokens} tokens: fit {fit.num_tokens}, select {select.num_tokens}, test {test.num_tokens}")

    measures = {name: dx.get_measure(name) for name in TRAINING_FREE}
    for name, kwargs in TRAINABLE.items():
        measure = dx.get_measure(name, label="next", max_epochs=epochs, seed=0, **kwargs)
        assert isinstance(measure, dx.TrainableMeasure)
        measures[name] = measure.fit(fit.decision_states("next"), list(fit.labels("next")))

    report = dx.evaluate_measures(measures, select, test, label="next")
    print(f"{'measure':>12} {'mean F1':>8} {'trivial F1':>10} {'gain':>7} {'AUROC':>6} {'beats trivial':>13}")
    for name, row in report["summary"].items():
        print(f"{name:>12} {row['mean_f1']:>8.3f} {row['mean_trivial_f1']:>10.3f} {row['mean_f1_gain']:>+7.3f} "
              f"{row['mean_auroc']:>6.3f} {row['beats_trivial']:>6}/{row['transitions']}")  # fmt: skip
    best = max(report["summary"], key=lambda n: report["summary"][n]["mean_auroc"])
    print(f"best AUROC: {best}")


if __name__ == "__main__":
    main()
