"""Collector overhead on a 12-layer, 768-wide random GPT-2-shaped model (batch 4 x 512 tokens).

Prints JSON: forward time with a collector attached but capturing nothing, and capturing all
deltas, each as a ratio to the bare forward measured in the same run (interleaved repeats,
median); and the peak extra memory of capture-all against the bytes it captures (each
measured in a fresh subprocess as the growth of the peak RSS over a bare forward).

Usage:
    python benchmarks/collector_overhead.py [--repeats 7] [--layers 12] [--hidden 768]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch


def build(layers: int, hidden: int):
    from deltaexit.testing import tiny_model

    heads = max(1, hidden // 64)
    return tiny_model(
        "gpt2",
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=50257,
        seed=0,
        n_positions=1024,
        max_position_embeddings=1024,
    )


def one_forward(model, ids, mode: str):
    import deltaexit as dx

    if mode == "bare":
        start = time.perf_counter()
        model(input_ids=ids)
        return time.perf_counter() - start, None
    capture = () if mode == "idle" else ("delta",)
    with dx.collect(model, capture) as trace:
        start = time.perf_counter()
        model(input_ids=ids)
        elapsed = time.perf_counter() - start
    return elapsed, trace


def _peak_rss_kib() -> int:
    """Peak RSS (VmHWM) in KiB; falls back to ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak_rss_kib() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux) and return it in KiB.

    ru_maxrss is inherited from the parent across fork/exec, so it cannot serve as a baseline.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _peak_rss_kib()


def memory_child(mode: str, layers: int, hidden: int, batch: int, seq: int) -> None:
    """Run one forward in this process and print peak RSS growth over the pre-forward baseline."""
    torch.manual_seed(0)
    model = build(layers, hidden)
    ids = torch.randint(0, 50257, (batch, seq))
    with torch.no_grad():
        model(input_ids=ids[:, :8])  # warm up kernels and the structure check
        import deltaexit as dx

        dx.find_structure(model)
        base = _reset_peak_rss_kib()
        _, trace = one_forward(model, ids, mode)
        peak = _peak_rss_kib()
        captured = 0 if trace is None else trace.delta.numel() * trace.delta.element_size()
    print(json.dumps({"peak_growth_bytes": (peak - base) * 1024, "captured_bytes": captured}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--memory-child", choices=["bare", "delta"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.layers, args.hidden, args.batch, args.seq)
        return

    import deltaexit as dx

    # Memory first, in fresh subprocesses, while this process is still small.
    def child(mode: str) -> dict:
        cmd = [
            sys.executable,
            __file__,
            "--memory-child",
            mode,
            "--layers",
            str(args.layers),
            "--hidden",
            str(args.hidden),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        return json.loads(
            subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        )

    bare_mem, delta_mem = child("bare"), child("delta")
    print(json.dumps({"memory_children": [bare_mem, delta_mem]}), file=sys.stderr)
    torch.manual_seed(0)
    model = build(args.layers, args.hidden)
    ids = torch.randint(0, 50257, (args.batch, args.seq))
    times: dict[str, list[float]] = {"bare": [], "idle": [], "delta": []}
    with torch.no_grad():
        dx.find_structure(model)
        one_forward(model, ids, "bare")  # warm-up
        modes = list(times)
        for i in range(args.repeats):
            # Interleaved and rotated, so drift and position effects hit every mode alike.
            for mode in modes[i % 3 :] + modes[: i % 3]:
                times[mode].append(one_forward(model, ids, mode)[0])
    median = {k: statistics.median(v) for k, v in times.items()}

    extra = delta_mem["peak_growth_bytes"] - bare_mem["peak_growth_bytes"]
    result = {
        "model": f"gpt2-shaped random, {args.layers} layers x {args.hidden} wide",
        "input": f"batch {args.batch} x {args.seq} tokens",
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "median_forward_s": median,
        "ratio_idle_to_bare": median["idle"] / median["bare"],
        "ratio_capture_all_delta_to_bare": median["delta"] / median["bare"],
        "captured_bytes": delta_mem["captured_bytes"],
        "peak_extra_bytes_capture_all": extra,
        "peak_extra_over_captured": extra / delta_mem["captured_bytes"],
        "targets": {"ratio_idle_to_bare": "<= 1.03", "peak_extra_over_captured": "<= 1.2"},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
