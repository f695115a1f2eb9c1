"""Out-of-core fit and analysis from shards: peak memory as the corpus grows, throughput, 2-rank torchrun.

Prints JSON with:

* ``memory``: peak RSS (VmHWM, reset after a warm-up run on a separate 2,048-token collection) of the streamed fit
  (``measure.fit(ShardDataset)``) and of the streamed analysis (``dx.analyze_shards``) at 1x, 4x and 16x
  the base tokens, each in a fresh subprocess, with the baseline RSS and the growth above it;
  ``*_peak_ratio_16x_vs_1x`` are the target figures (<= 1.10). The in-memory fit (the collection
  materialised with ``load_features``, then ``fit(states, labels)``) is measured the same way for comparison.
* ``throughput``: tokens per second of the streamed fit and of the in-memory fit of the same measure on the
  same tokens, interleaved repeats in one process, median with spread, and the ratio.
* ``torchrun``: wall-clock of the same fit under ``torchrun --nproc_per_node 2`` (gloo) and 1 rank.

Collections are built once per scale (not timed): a random Llama-shaped model (4 layers, hidden 64, vocab
256), the bytes of ``--data`` (WikiText-2 valid where it exists, else the shipped sample, cycled) as token
ids, features ``delta`` (fp16), ``delta_norm``, ``lens_topk`` (k=5) — the scale-out recipe's features.

Usage:
    python benchmarks/fit_stream.py [--base-tokens 8192] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_memory import REPO, build_model, byte_documents, current_rss_mib, default_data, peak_rss_mib, reset_peak_rss

DEFAULT_DATA = default_data()
FEATURES = ("delta", "delta_norm", "lens_topk")
ANALYZE_MEASURES = ("delta-norm", "softmax-max", "softmax-gap", "delta-mlp")


def collect(args, tokens: int, out: Path, shard_tokens: int | None = None) -> None:
    from deltaexit.streaming import collect_to_disk

    shard_tokens = shard_tokens or args.shard_tokens
    collect_to_disk(build_model(args), byte_documents(args.data), out, features=FEATURES, topk=5,
                    context=args.context, batch_size=8, shard_tokens=shard_tokens, max_tokens=tokens,
                    dtype="float16", progress=False, overwrite=True)  # fmt: skip


def new_measure(args):
    import deltaexit as dx

    return dx.get_measure("delta-mlp", label="next", hidden_units=32, max_epochs=args.epochs, patience=args.epochs,
                          batch_size=1024, seed=0)  # fmt: skip


def fit_streamed(args, shards: Path):
    """``measure.fit(dataset)`` over the shards: one epoch is one pass, one shard in memory at a time."""
    import deltaexit as dx

    return new_measure(args).fit(dx.ShardDataset(shards, batch_size=1024), shuffle_rows=args.shuffle_rows)


def fit_in_memory(args, shards: Path):
    """The collection materialised (``load_features``), then the in-memory ``fit(states, labels)``."""
    import deltaexit as dx
    from deltaexit.streaming import layer_labels, layer_states

    data = dx.load_features(shards, features=("delta",), labels="next")
    manifest = dx.Manifest.load(shards)
    states = layer_states(data, manifest)[:-1]
    return new_measure(args).fit(states, layer_labels(data, "next"))


def analyze_streamed(args, shards: Path) -> dict:
    import deltaexit as dx

    tokens = dx.Manifest.load(shards).num_tokens
    return dx.analyze_shards(shards, tokens=tokens // 2, measures=list(args.analyze_measures),
                             fit_kwargs={"max_epochs": args.epochs, "hidden_units": 32}, batch_size=1024,
                             shuffle_rows=args.shuffle_rows)  # fmt: skip


def child(args) -> None:
    """One memory measurement (run in a fresh subprocess)."""
    run = {"fit": fit_streamed, "fit-in-memory": fit_in_memory, "analyze": analyze_streamed}[args.mode]
    run(args, args.warmup)  # lazy imports and one-time allocations, on a separate tiny collection
    reset_peak_rss()
    baseline = current_rss_mib()
    start = time.perf_counter()
    run(args, args.shards)
    elapsed = time.perf_counter() - start
    print(json.dumps({"mode": args.mode, "scale": args.scale, "seconds": elapsed, "baseline_rss_mib": baseline,
                      "peak_rss_mib": peak_rss_mib()}))  # fmt: skip


def child_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def common_flags(args) -> list[str]:
    return ["--layers", str(args.layers), "--hidden", str(args.hidden), "--context", str(args.context),
            "--epochs", str(args.epochs), "--shard-tokens", str(args.shard_tokens),
            "--shuffle-rows", str(args.shuffle_rows),
            "--analyze-measures", *args.analyze_measures]  # fmt: skip


def memory(args, dirs: dict[int, Path], warmup: Path) -> dict:
    rows = []
    for mode in args.memory_modes:
        for scale, shards in dirs.items():
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--scale", str(scale), "--shards", str(shards),
                   "--warmup", str(warmup), *common_flags(args)]  # fmt: skip
            done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{mode} x{scale} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["tokens"] = args.base_tokens * scale
            row["growth_mib"] = row["peak_rss_mib"] - row["baseline_rss_mib"]
            rows.append(row)
    out: dict = {"rows": rows}
    lo, hi = min(dirs), max(dirs)
    for mode in args.memory_modes:
        peak = {r["scale"]: r["peak_rss_mib"] for r in rows if r["mode"] == mode}
        out[f"{mode}_peak_ratio_{hi}x_vs_{lo}x"] = peak[hi] / peak[lo]
    return out


def throughput(args, shards: Path, tokens: int) -> dict:
    from deltaexit.threads import torch_threads
    from deltaexit.timing import spread

    times: dict[str, list[float]] = {"streamed": [], "in_memory": []}
    with torch_threads(1):
        for _ in range(args.repeats):
            for name, fn in (("streamed", fit_streamed), ("in_memory", fit_in_memory)):
                start = time.perf_counter()
                measure = fn(args, shards)
                times[name].append(time.perf_counter() - start)
    epochs = len(measure.history_) - 1
    return {
        "tokens": tokens, "epochs_run": epochs,
        "streamed_tokens_per_s": spread([tokens * epochs / t for t in times["streamed"]]),
        "in_memory_tokens_per_s": spread([tokens * epochs / t for t in times["in_memory"]]),
        "ratio_streamed_over_in_memory": spread([m / s for s, m in zip(times["streamed"], times["in_memory"])]),
        "seconds": times,
    }  # fmt: skip


TORCHRUN_WORKER = """
import sys, time
import torch
import deltaexit as dx
from deltaexit.streaming import init_distributed_from_env
torch.set_num_threads(1)
owned = init_distributed_from_env()
shards, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
measure = dx.get_measure("delta-mlp", label="next", hidden_units=32, max_epochs=epochs, patience=epochs,
                         batch_size=1024, seed=0)
start = time.perf_counter()
measure.fit(dx.ShardDataset(shards, batch_size=1024), shuffle_rows=int(sys.argv[4]))   # each rank: its own shards
elapsed = time.perf_counter() - start
measure.save(out)   # rank 0 writes
if not owned or torch.distributed.get_rank() == 0:
    print("FIT_SECONDS", elapsed, "EPOCHS", len(measure.history_) - 1, flush=True)
if owned:
    torch.distributed.destroy_process_group()
"""


def dx_tokens(shards: Path) -> int:
    import deltaexit as dx

    return dx.Manifest.load(shards).num_tokens


def torchrun(args, shards: Path) -> dict:
    from deltaexit.timing import spread

    work = Path(tempfile.mkdtemp(prefix="dx-fit-ddp-"))
    script = work / "worker.py"
    script.write_text(TORCHRUN_WORKER)
    times: dict[int, list[float]] = {1: [], 2: []}
    fit_times: dict[int, list[float]] = {1: [], 2: []}
    try:
        for _ in range(args.repeats):
            for ranks in (1, 2):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                       str(script), str(shards), str(work / f"m{ranks}"), str(args.epochs),
                       str(args.shuffle_rows)]  # fmt: skip
                start = time.perf_counter()
                done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, check=False)
                wall = time.perf_counter() - start
                if done.returncode != 0:
                    raise RuntimeError(f"torchrun x{ranks} failed:\n{done.stderr[-3000:]}")
                times[ranks].append(wall)
                line = next(x for x in done.stdout.splitlines() if x.startswith("FIT_SECONDS"))
                fit_times[ranks].append(float(line.split()[1]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "wall_s_1_rank": spread(times[1]), "wall_s_2_ranks": spread(times[2]),
        "speedup_2_over_1": spread([a / b for a, b in zip(times[1], times[2])]),
        "fit_s_1_rank": spread(fit_times[1]), "fit_s_2_ranks": spread(fit_times[2]),
        "fit_speedup_2_over_1": spread([a / b for a, b in zip(fit_times[1], fit_times[2])]),
        "tokens": dx_tokens(shards),
        "note": "wall_s: the whole torchrun command (process start, imports, gloo rendezvous, fit, save); fit_s: "
                "measure.fit(dataset) alone, on rank 0 (the ranks step together)",
    }  # fmt: skip


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-tokens", type=int, default=8192)
    p.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--shard-tokens", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shuffle-rows", type=int, default=16384, help="shuffle buffer of the streamed fit, in rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--only", nargs="+", default=["memory", "throughput", "torchrun"],
                   choices=["memory", "throughput", "torchrun"])  # fmt: skip
    p.add_argument("--memory-modes", nargs="+", default=["fit", "analyze", "fit-in-memory"],
                   choices=["fit", "analyze", "fit-in-memory"])  # fmt: skip
    p.add_argument("--analyze-measures", nargs="+", default=list(ANALYZE_MEASURES))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="fit", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--shards", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.child:
        torch.set_num_threads(1)
        child(args)
        return
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="dx-fit-stream-"))
    try:
        dirs = {}
        for scale in args.scales:
            dirs[scale] = root / f"x{scale}"
            collect(args, args.base_tokens * scale, dirs[scale])
        result: dict = {
            "config": {"base_tokens": args.base_tokens, "scales": args.scales, "layers": args.layers,
                       "hidden": args.hidden, "context": args.context, "shard_tokens": args.shard_tokens,
                       "features": FEATURES, "dtype": "float16", "measure": "delta-mlp (hidden 32), label next",
                       "epochs": args.epochs, "analyze_measures": args.analyze_measures,
                       "shuffle_rows": args.shuffle_rows, "torch_threads": 1,
                       "data": str(args.data), "cpus": os.cpu_count()},
        }  # fmt: skip
        if "memory" in args.only:
            collect(args, 2048, root / "warmup", shard_tokens=256)
            result["memory"] = memory(args, dirs, root / "warmup")
        if "throughput" in args.only:
            result["throughput"] = throughput(args, dirs[max(dirs)], args.base_tokens * max(dirs))
        if "torchrun" in args.only:
            result["torchrun"] = torchrun(args, dirs[max(dirs)])
        result["total_seconds"] = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
