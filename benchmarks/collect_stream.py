"""Streaming collection to disk vs in-memory collection; peak memory as the corpus grows.

Prints JSON with:

* ``throughput``: tokens/s of ``dx.collect_to_disk`` (safetensors shards, sha256, manifest)
  and of an in-memory collection (``dx.collect`` over the same batches, captured tensors
  kept in a list) on the same model and tokens, interleaved repeats, median, and the ratio.
* ``memory``: peak RSS (``ru_maxrss``) of each mode at 1x, 4x, 16x the base corpus, each in a
  fresh subprocess, with the RSS right after the model was built (the baseline) and the
  growth above it; ``streaming_peak_ratio_16x_vs_1x`` is the target figure (<= 1.10).
* ``resume``: a streaming run killed (SIGKILL) at a random point and resumed, compared with
  an uninterrupted run: tokens lost, tokens duplicated, identical shard bytes.

Model: a random Llama-shaped model (default 4 layers, hidden 64, vocab 256); data: the
bytes of ``--data`` (default ``../shared/data/wikitext-2/valid.txt`` where it exists, else the shipped sample)
as token ids (one document a line).

Usage:
    python benchmarks/collect_stream.py [--base-tokens 8192] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_memory import REPO, build_model, byte_documents, current_rss_mib, default_data, peak_rss_mib, reset_peak_rss

DEFAULT_DATA = default_data()
FEATURES = ("delta", "delta_norm", "lens_topk")


def stream_kwargs(args, tokens: int) -> dict:
    return {
        "features": FEATURES,
        "topk": 5,
        "context": args.context,
        "batch_size": args.batch_size,
        "shard_tokens": args.shard_tokens,
        "max_tokens": tokens,
        "dtype": "float16",
        "progress": False,
    }


def run_streaming(model, args, tokens: int, out: Path) -> float:
    from deltaexit.streaming import collect_to_disk

    start = time.perf_counter()
    manifest = collect_to_disk(model, byte_documents(args.data), out, overwrite=True, **stream_kwargs(args, tokens))
    elapsed = time.perf_counter() - start
    assert manifest.num_tokens == tokens, (manifest.num_tokens, tokens)
    return elapsed


def run_in_memory(model, args, tokens: int) -> tuple[float, list]:
    """The same batches through ``dx.collect``; every trace's tensors kept in memory (fp16 deltas)."""
    import deltaexit as dx
    from deltaexit.streaming.corpus import batch_windows, token_windows

    kept = []
    start = time.perf_counter()
    for batch in batch_windows(token_windows(byte_documents(args.data), args.context, tokens), args.batch_size):
        seq = max(len(w.ids) for w in batch)
        ids = torch.zeros(len(batch), seq, dtype=torch.long)
        mask = torch.zeros(len(batch), seq, dtype=torch.long)
        for row, w in enumerate(batch):
            ids[row, : len(w.ids)] = torch.tensor(w.ids)
            mask[row, : len(w.ids)] = 1
        with torch.no_grad(), dx.collect(model, ("delta",), topk=5, dtype=torch.float16) as trace:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        keep = mask.bool()
        delta = trace.delta[:, keep]
        kept.append(
            {
                "delta": delta,
                "delta_norm": delta.float().norm(dim=-1),
                "topk_ids": trace.topk_ids[:, keep],
                "topk_probs": trace.topk_probs[:, keep],
            }
        )
    return time.perf_counter() - start, kept


def child(args) -> None:
    """One memory measurement (run in a fresh subprocess)."""
    torch.manual_seed(0)
    model = build_model(args)
    import deltaexit as dx

    dx.find_structure(model)
    reset_peak_rss()  # the peak of imports and model building is not the collection's
    baseline = current_rss_mib()
    tokens = args.base_tokens * args.scale
    if args.mode == "stream":
        out = Path(tempfile.mkdtemp(prefix="dx-bench-"))
        try:
            elapsed = run_streaming(model, args, tokens, out)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        stored = None
    else:
        elapsed, kept = run_in_memory(model, args, tokens)
        stored = sum(t.numel() * t.element_size() for part in kept for t in part.values()) / 2**20
    print(
        json.dumps(
            {
                "mode": args.mode,
                "scale": args.scale,
                "tokens": tokens,
                "seconds": elapsed,
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak_rss_mib(),
                "kept_in_memory_mib": stored,
            }
        )
    )


def child_cmd(args, mode: str, scale: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        "--mode",
        mode,
        "--scale",
        str(scale),
        "--base-tokens",
        str(args.base_tokens),
        "--layers",
        str(args.layers),
        "--hidden",
        str(args.hidden),
        "--context",
        str(args.context),
        "--batch-size",
        str(args.batch_size),
        "--shard-tokens",
        str(args.shard_tokens),
        "--data",
        str(args.data),
        "--threads",
        str(args.threads),
    ]


def child_env() -> dict:
    src = str(REPO / "src")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def memory(args) -> dict:
    rows = []
    for scale in args.scales:
        for mode in ("stream", "memory"):
            done = subprocess.run(
                child_cmd(args, mode, scale), env=child_env(), check=True, capture_output=True, text=True
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["growth_mib"] = row["peak_rss_mib"] - row["baseline_rss_mib"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    peak = {(r["mode"], r["scale"]): r["peak_rss_mib"] for r in rows}
    lo, hi = min(args.scales), max(args.scales)
    return {
        "rows": rows,
        f"streaming_peak_ratio_{hi}x_vs_{lo}x": peak[("stream", hi)] / peak[("stream", lo)],
        f"in_memory_peak_ratio_{hi}x_vs_{lo}x": peak[("memory", hi)] / peak[("memory", lo)],
        "target_streaming_ratio_max": 1.10,
    }


def throughput(args) -> dict:
    model = build_model(args)
    tokens = args.base_tokens
    stream, mem = [], []
    with tempfile.TemporaryDirectory(prefix="dx-bench-") as tmp:
        run_streaming(model, args, min(tokens, 2048), Path(tmp) / "warm")  # warm-up (structure check, caches)
        for _ in range(args.repeats):
            stream.append(run_streaming(model, args, tokens, Path(tmp) / "s"))
            elapsed, kept = run_in_memory(model, args, tokens)
            del kept
            mem.append(elapsed)
    s_tps, m_tps = tokens / statistics.median(stream), tokens / statistics.median(mem)
    return {
        "tokens": tokens,
        "repeats": args.repeats,
        "stream_tokens_per_s": s_tps,
        "in_memory_tokens_per_s": m_tps,
        "ratio_stream_vs_in_memory": s_tps / m_tps,
    }


def resume_check(args) -> dict:
    """SIGKILL a streaming subprocess at a random point, resume it, compare with an uninterrupted run.

    The kill point: after a random number k of complete shards (1 <= k <= n-2) plus a random
    fraction of one shard's time (measured on the uninterrupted run), so it lands anywhere in a
    forward pass, a shard write or a manifest update.
    """
    from deltaexit.streaming import Manifest, load_features

    rng = random.Random(args.seed)
    tokens = args.base_tokens
    shard_tokens = args.resume_shard_tokens
    with tempfile.TemporaryDirectory(prefix="dx-bench-") as tmp:
        ref, run = Path(tmp) / "ref", Path(tmp) / "run"
        cmd = [sys.executable, __file__, "--stream-child", "--base-tokens", str(tokens),
               "--layers", str(args.layers), "--hidden", str(args.hidden), "--context", str(args.context),
               "--batch-size", str(args.batch_size), "--shard-tokens", str(shard_tokens),
               "--data", str(args.data), "--threads", str(args.threads)]  # fmt: skip

        def shards_of(out: Path) -> int:
            try:
                return len(Manifest.read(out / "manifest.rank00000.json").shards)
            except (FileNotFoundError, ValueError):
                return 0

        def launch(out: Path) -> subprocess.Popen:
            return subprocess.Popen(
                [*cmd, "--out", str(out)],
                env=child_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

        proc, stamps, seen = launch(ref), [], 0
        while proc.poll() is None:
            now = shards_of(ref)
            if now > seen:
                stamps += [time.perf_counter()] * (now - seen)
                seen = now
            time.sleep(0.002)
        assert proc.returncode == 0, "the uninterrupted run failed"
        total = len(Manifest.load(ref).shards)
        shard_time = statistics.median([b - a for a, b in itertools.pairwise(stamps)] or [0.1])
        kill_after = rng.randint(1, max(1, total - 2))
        delay = rng.uniform(0.0, shard_time)
        proc = launch(run)
        while shards_of(run) < kill_after and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        killed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        shards_at_kill = shards_of(run)
        finished_before_kill = (run / "manifest.json").exists()
        subprocess.run([*cmd, "--out", str(run)], env=child_env(), check=True, capture_output=True)
        a, b = Manifest.load(ref), Manifest.load(run)
        ka, kb = load_features(a), load_features(b)
        keys_a = (ka["window"] * 100_000 + ka["doc_position"]).tolist()
        keys_b = (kb["window"] * 100_000 + kb["doc_position"]).tolist()
        return {
            "shard_tokens": shard_tokens,
            "shards": total,
            "kill_after_shards": kill_after,
            "kill_delay_s": delay,
            "shard_time_s": shard_time,
            "killed_mid_run": killed and not finished_before_kill and shards_at_kill < total,
            "complete_shards_at_kill": shards_at_kill,
            "tokens_reference": len(keys_a),
            "tokens_resumed": len(keys_b),
            "tokens_lost": len(set(keys_a) - set(keys_b)),
            "tokens_duplicated": len(keys_b) - len(set(keys_b)),
            "identical_shard_bytes": [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards],
            "identical_features": all(torch.equal(ka[k], kb[k]) for k in ka),
        }


def stream_child(args) -> None:
    from deltaexit.streaming import collect_to_disk

    model = build_model(args)
    collect_to_disk(model, byte_documents(args.data), args.out, **stream_kwargs(args, args.base_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-tokens", type=int, default=8192)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-tokens", type=int, default=2048)
    parser.add_argument("--resume-shard-tokens", type=int, default=512, help="shard size of the kill test")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the random kill point (default: random)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--only", choices=["throughput", "memory", "resume"], nargs="+", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="stream", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data.is_file():
        parser.error(f"data file {args.data} not found; pass --data")
    if args.child:
        return child(args)
    if args.stream_child:
        return stream_child(args)
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    import deltaexit as dx

    result = {
        "benchmark": "collect_stream",
        "deltaexit": dx.__version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": {"type": "llama (random)", "layers": args.layers, "hidden": args.hidden, "vocab": 256},
        "settings": {
            "features": list(FEATURES),
            "topk": 5,
            "dtype": "float16",
            "context": args.context,
            "batch_size": args.batch_size,
            "shard_tokens": args.shard_tokens,
            "base_tokens": args.base_tokens,
            "scales": args.scales,
            "kill_seed": args.seed,
        },
    }
    parts = {"throughput": throughput, "memory": memory, "resume": resume_check}
    for name, part in parts.items():
        if args.only is None or name in args.only:
            result[name] = part(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
