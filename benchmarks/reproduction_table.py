"""Side-by-side tables: the research note's figures and a ``deltaexit analyze --json`` result.

Usage:
    python benchmarks/reproduction_table.py docs/results/analyze_reference_v1.json > tables.md

Prints Markdown (one section per label kind) and, on stderr, a JSON summary of the targets.
"""

from __future__ import annotations

import json
import sys

# The note (shared/seed): per transition 1→2 .. 7→8.
NOTE = {
    "change_rate": [60.8, 66.0, 60.8, 56.1, 48.3, 39.3, 46.2],
    "r": [0.216, 0.132, 0.141, 0.135, 0.154, 0.189, 0.154],
    "delta-norm": [58.3, 50.8, 56.2, 61.1, 68.7, 74.2, 70.1],
    "linear": [48.1, 48.5, 48.3, 51.2, 67.0, 76.0, 71.9],
    "delta-mlp": [65.8, 57.4, 60.7, 63.7, 74.6, 79.2, 77.9],
}
NOTE_MEAN = {"delta-norm": 62.8, "linear": 58.7, "delta-mlp": 68.5}
NOTE_DELTA = [3.30, 3.31, 3.25, 3.27, 3.35, 3.28, 3.37, 6.43]
NOTE_RATIO = [0.419, 0.409, 0.402, 0.405, 0.415, 0.405, 0.417, 0.796]
DELTA_BASED = ("delta-norm", "delta-ratio", "linear", "delta-mlp", "delta-mlp/per-layer")
SHOWN = (
    "delta-norm",
    "linear",
    "delta-mlp",
    "delta-mlp/per-layer",
    "hdelta-mlp",
    "hdelta-mlp/per-layer",
    "linear(h)",
    "state-cosine",
    "softmax-max",
    "softmax-gap",
)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def label_tables(kind: str, ev: dict) -> dict:
    """Print the F1, threshold-free and AUROC tables of one label; return its reproduction targets."""
    names = [n for n in SHOWN if n in ev["summary"]]
    trs = ev["transitions"]
    print(f"\n### Label `{kind}`: F1 at the threshold chosen on the select split (test tokens)\n")
    head = "| transition | note change | ours change | note r | ours r | ours r (‖delta‖ of block l+1) |"
    head += " trivial F1 |"
    head += " note delta-norm | note linear | note delta-MLP | " + " | ".join(names) + " |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for i, t in enumerate(trs):
        note = i < len(NOTE["r"]) and kind in ("next", "kept")
        cells = [
            t["transition"],
            f"{NOTE['change_rate'][i]:.1f}%" if note else "",
            pct(t["change_rate"]),
            f"{NOTE['r'][i]:.3f}" if note else "",
            f"{t['r_delta_change']:.3f}" if t["r_delta_change"] is not None else "-",
            f"{t['r_next_delta_change']:.3f}" if t["r_next_delta_change"] is not None else "-",
            pct(t["trivial_f1"]),
        ]
        cells += [f"{NOTE[k][i]:.1f}%" if note else "" for k in ("delta-norm", "linear", "delta-mlp")]
        for n in names:
            m = t["measures"][n]
            mark = "" if m["f1_gain"] > 0 else " ✗"
            cells.append(pct(m["f1"]) + mark)
        print("| " + " | ".join(cells) + " |")
    s = ev["summary"]
    triv = s[names[0]]["mean_trivial_f1"]
    mean_cells = ["**mean**", "", "", "", "", "", pct(triv)]
    if kind in ("next", "kept"):
        mean_cells += [f"{NOTE_MEAN[k]:.1f}%" for k in ("delta-norm", "linear", "delta-mlp")]
    else:
        mean_cells += ["", "", ""]
    mean_cells += [f"**{pct(s[n]['mean_f1'])}**" for n in names]
    print("| " + " | ".join(mean_cells) + " |")
    beats = ["beats trivial", "", "", "", "", "", "", "", "", ""]
    beats += [f"{s[n]['beats_trivial']}/{s[n]['transitions']}" for n in names]
    print("| " + " | ".join(beats) + " |")
    print("\n✗ = at or below the trivial all-positive F1 on the test tokens.")

    print(f"\n### Label `{kind}`: threshold-free metrics (test tokens), mean over transitions\n")
    print("| measure | mean F1 | mean F1 − trivial | AUROC | AUPRC | balanced acc. | beats trivial |")
    print("|---|---|---|---|---|---|---|")
    for n in names:
        m = s[n]
        print(
            f"| {n} | {pct(m['mean_f1'])} | {100 * m['mean_f1_gain']:+.1f} pt | {m['mean_auroc']:.3f} | "
            f"{m['mean_auprc']:.3f} | {m['mean_balanced_accuracy']:.3f} | "
            f"{m['beats_trivial']}/{m['transitions']} |"
        )
    print(f"\n### Label `{kind}`: AUROC per transition\n")
    print("| transition | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for t in trs:
        print(
            f"| {t['transition']} | "
            + " | ".join(
                f"{t['measures'][n]['auroc']:.3f}" if t["measures"][n]["auroc"] is not None else "-" for n in names
            )
            + " |"
        )
    best = max((n for n in names if n in DELTA_BASED), key=lambda n: s[n]["mean_f1"])
    return {
        "best_delta_based": best,
        "mean_f1": s[best]["mean_f1"],
        "beats_note_68_5": s[best]["mean_f1"] > 0.685,
        "beats_trivial_every_transition": s[best]["beats_trivial"] == s[best]["transitions"],
        "mean_auroc": s[best]["mean_auroc"],
    }


def layer_table(result: dict) -> None:
    """Print the per-layer table and the oracle line."""
    print("\n### Per layer (test tokens)\n")
    print("| layer | note ‖delta‖ | ours ‖delta‖ | note ‖delta‖/‖h_in‖ | ours ‖delta‖/‖h_in‖ |", end="")
    print(" ours saturated |")
    print("|---|---|---|---|---|---|")
    for i, (row, srow) in enumerate(zip(result["layers"], result["oracle"]["per_layer"])):
        nd = f"{NOTE_DELTA[i]:.2f}" if i < len(NOTE_DELTA) else ""
        nr = f"{NOTE_RATIO[i]:.3f}" if i < len(NOTE_RATIO) else ""
        print(
            f"| {row['layer']} | {nd} | {row['delta_norm']:.2f} | {nr} | {row['delta_ratio']:.3f} | "
            f"{pct(srow['saturated'])} |"
        )
    o = result["oracle"]
    print(
        f"\nOracle: mean saturation layer {o['oracle_mean_layer']:.2f} of {o['num_layers']}; a perfect, free "
        f"predictor would save {pct(o['oracle_compute_saved'])} of block compute."
    )


def main(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        result = json.load(handle)
    targets = {kind: label_tables(kind, ev) for kind, ev in result["labels"].items()}
    layer_table(result)
    print(json.dumps(targets, indent=2), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
