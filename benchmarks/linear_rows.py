"""What a multi-token block call costs on this CPU: ``F.linear`` time for M rows as a ratio to one row (JSON).

``recompute`` re-runs held-back tokens 2-3 at a time and ``verify`` verifies several drafted positions in one
call; ``stats.blocks_run`` counts such a call as one block, which is right where a matrix product of a few rows
costs what one row costs (memory-bound, as on a GPU). This prints what it costs here, for the weight shapes of the
random configs in ``docs/generate.md``.

Usage:
    python benchmarks/linear_rows.py --threads 1 > rows.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = ((768, 768), (768, 1536), (2048, 512), (2048, 2048), (2048, 5632), (5632, 2048))


def timed(fn, repeats: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):  # best of three batches of calls: the least disturbed by other load
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    with torch.no_grad():
        for d_in, d_out in SHAPES:
            weight = torch.randn(d_out, d_in)
            times = {}
            for m in args.rows:
                x = torch.randn(1, m, d_in)
                times[m] = timed(lambda x=x, w=weight: torch.nn.functional.linear(x, w), args.repeats)
            row = {
                "in": d_in,
                "out": d_out,
                "one_row_ms": round(times[args.rows[0]] * 1e3, 4),
                "ratio_to_one_row": {m: round(t / times[args.rows[0]], 2) for m, t in times.items()},
            }
            out.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"torch": torch.__version__, "threads": args.threads, "results": out}))


if __name__ == "__main__":
    main()
