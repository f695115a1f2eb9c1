"""Stream a corpus to safetensors shards, then fit an exit predictor from the shards.

``dx.collect_to_disk`` runs the shipped reference model over a text file (here the shipped
sample; any file with one document a line works) in windows and writes per-token features
(``h_out``, ``delta`` and the lens top-k, from which the labels are derived) into shards with a
manifest. Memory stays flat whatever the corpus size, and a second call with the same settings
resumes instead of recomputing. ``dx.ShardDataset`` reads the shards back lazily; here the
first batch fits a trainable measure (``delta-mlp``, an MLP on the residual delta) and the next
batch, tokens it never saw, tests it against the training-free ``delta-norm`` by AUROC per layer.

Run:
    python examples/06_stream_and_fit.py
    python examples/06_stream_and_fit.py --quick            # 2,048 tokens (CI)
    python examples/06_stream_and_fit.py --data corpus.txt --out feats/
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import deltaexit as dx
from deltaexit.evaluation import auroc
from deltaexit.samples import sample_path
from deltaexit.streaming import layer_labels, layer_states


def collect(model, tokenizer, data: Path, out: Path, tokens: int) -> dx.Manifest:
    return dx.collect_to_disk(
        model,
        data,
        out,
        tokenizer=tokenizer,
        features=("h_out", "delta", "lens_topk"),
        context=128,
        batch_size=8,
        shard_tokens=1024,
        max_tokens=tokens,
        dtype="float32",
        progress=False,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="text file, one document a line (default: sample)")
    parser.add_argument("--out", type=Path, help="shard directory (default: a temporary one)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="2,048 tokens, 5 epochs")
    args = parser.parse_args()
    tokens, epochs = (2048, 5) if args.quick else (args.tokens, 30)

    model, tokenizer = dx.load_reference("v1")
    data = args.data or sample_path()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp, "feats")
        manifest = collect(model, tokenizer, data, out, tokens)
        shards = sorted(p.name for p in out.glob("*.safetensors"))
        print(f"collected {manifest.num_tokens} tokens x {manifest.num_layers} layers into {len(shards)} shards")
        start = time.perf_counter()
        again = collect(model, tokenizer, data, out, tokens)  # same settings: resumes, nothing to do
        print(f"second call resumed in {time.perf_counter() - start:.2f} s with {again.num_tokens} tokens")

        half = manifest.num_tokens // 2
        batches = iter(dx.ShardDataset(out, labels="next", batch_size=half))  # lazy: one shard in memory
        fit_batch, test_batch = next(batches), next(batches)
        fit_states = layer_states(fit_batch, manifest)[:-1]  # the decision after block l, for l < L
        test_states = layer_states(test_batch, manifest)[:-1]
        fit_y, test_y = layer_labels(fit_batch, "next"), layer_labels(test_batch, "next")

        mlp = dx.get_measure("delta-mlp", label="next", max_epochs=epochs, seed=0)
        assert isinstance(mlp, dx.TrainableMeasure)
        mlp.fit(fit_states, fit_y)
        norm = dx.get_measure("delta-norm")
        print(f"test AUROC per decision layer ({len(test_y[0])} unseen tokens, label next)")
        print(f"{'layer':>5} {'delta-mlp':>9} {'delta-norm':>10}")
        for state, y in zip(test_states, test_y):
            print(f"{state.layer + 1:>5} {auroc(mlp.score(state), y):>9.3f} {auroc(norm.score(state), y):>10.3f}")


if __name__ == "__main__":
    main()
