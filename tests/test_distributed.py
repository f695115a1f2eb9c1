"""Data-parallel collection on torch.distributed (gloo, 2 CPU processes) equals a single-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deltaexit.cli import main
from deltaexit.streaming import Manifest, ManifestError, collect_to_disk, load_features, merge_manifests
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


KW = {"context": 12, "batch_size": 2, "shard_tokens": 30, "features": ("delta", "delta_norm", "lens_topk"),
      "topk": 3, "subsample": 0.7, "seed": 1, "progress": False}  # fmt: skip


def _docs() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (15,), generator=g)]


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=0)
        manifest = collect_to_disk(model, _docs(), out, **KW)
        assert manifest.complete and manifest.rank is None  # every rank sees the merged manifest
    finally:
        dist.destroy_process_group()


def _single(out: Path) -> Manifest:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return collect_to_disk(tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=0), _docs(), out, **KW)
    finally:
        torch.set_num_threads(threads)


def _corpus_order(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    order = torch.argsort(data["window"] * 100_000 + data["doc_position"])
    return {k: v[order] for k, v in data.items()}


def _assert_equal_collections(single: Manifest, parallel: Manifest) -> None:
    assert parallel.num_tokens == single.num_tokens
    assert parallel.window_ids() == single.window_ids()  # every window exactly once
    # Shards of different ranks interleave shard by shard, not token by token: compare in corpus order.
    a, b = _corpus_order(load_features(single)), _corpus_order(load_features(parallel))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_gloo_ranks_give_exactly_the_single_process_collection(tmp_path):
    out = tmp_path / "parallel"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    parallel = Manifest.load(out)
    assert {s["rank"] for s in parallel.shards} == {0, 1}
    assert parallel.settings["world_size"] == 2
    # Each rank wrote its own shards and its own manifest.
    assert sorted(p.name for p in out.glob("manifest.rank*.json")) == [
        "manifest.rank00000.json",
        "manifest.rank00001.json",
    ]
    parallel.verify()
    _assert_equal_collections(_single(tmp_path / "single"), parallel)


def test_independent_parts_merge_when_the_last_one_finishes(tmp_path):
    model = tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=0)
    out = tmp_path / "parts"
    first = collect_to_disk(model, _docs(), out, rank=1, world_size=2, **KW)
    assert first.rank == 1 and not (out / "manifest.json").exists()
    with pytest.raises(ManifestError, match="rank 0"):
        merge_manifests(out, 2)
    merged = collect_to_disk(model, _docs(), out, rank=0, world_size=2, **KW)
    assert merged.rank is None and merged.complete
    _assert_equal_collections(_single(tmp_path / "single"), merged)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_torchrun_launches_the_collect_command(tmp_path):
    from test_streaming_cli import save_model_dir, write_corpus

    model_dir = save_model_dir(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.txt", repeat=4)
    args = ["collect", "--model", str(model_dir), "--data", str(data), "--context", "8", "--shard-tokens",
            "30", "--features", "delta,lens_topk", "--no-progress", "--device", "cpu"]  # fmt: skip
    src = str(Path(__file__).parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "deltaexit"]
    done = subprocess.run([*launch, *args, "--out", str(tmp_path / "tr")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        assert main([*args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    parallel, single = Manifest.load(tmp_path / "tr"), Manifest.load(tmp_path / "one")
    assert parallel.settings["world_size"] == 2 and {s["rank"] for s in parallel.shards} == {0, 1}
    _assert_equal_collections(single, parallel)
