"""Shared pieces of the memory benchmarks (``collect_stream.py``, ``fit_stream.py``): peak-RSS probes on Linux,
the tiny byte-level model they run and the byte-token corpus they read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    """WikiText-2 valid beside the project where it exists, else the sample the package ships (cycled by
    :func:`byte_documents`, so any size works)."""
    path = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
    if path.is_file():
        return path
    from deltaexit.samples import sample_path

    return Path(sample_path())


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mib() -> float:
    """Peak resident set size since the last reset, MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def current_rss_mib() -> float:
    """Resident set size now, MiB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(args: Any) -> Any:
    """The tiny random llama the benchmarks run (vocab 256: byte tokens), ``args.layers`` x ``args.hidden``."""
    from deltaexit.testing import tiny_model

    return tiny_model("llama", num_layers=args.layers, hidden=args.hidden, heads=4, vocab=256, seed=0,
                      max_position_embeddings=max(256, args.context))  # fmt: skip


def byte_documents(path: Path) -> Iterator[list[int]]:
    """One document a non-empty line, its UTF-8 bytes as token ids (vocab 256), cycled forever."""
    while True:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = line.strip()
                if text:
                    yield list(text.encode("utf-8"))
