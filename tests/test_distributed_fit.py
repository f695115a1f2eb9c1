"""Data-parallel streamed fits on torch.distributed (gloo, 2 CPU processes) equal a one-process fit (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deltaexit.measures import get_measure, load_measure
from deltaexit.streaming import ShardDataset, collect_to_disk
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

# 8 shards: 7 for training (uneven: 4 and 3 per rank with 2 streams), 1 held out (only rank 0 reads it).
COLLECT = {"context": 8, "batch_size": 1, "shard_tokens": 24, "topk": 2, "dtype": None, "progress": False}
FITS = {
    "mlp": ("delta-mlp", {"hidden_units": 8, "max_epochs": 3, "batch_size": 16}, {}),
    "per-layer": ("linear", {"per_layer": True, "max_epochs": 2, "batch_size": 8, "label": "kept"}, {"streams": 4}),
}


def _worker(rank: int, world: int, init_file: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = ShardDataset(data, batch_size=10, shuffle=True, seed=2)
        for key, (name, params, fit_kw) in FITS.items():
            measure = get_measure(name, **params).fit(ds, **fit_kw)
            measure.save(f"{out}/{key}")  # rank 0 writes, every rank waits
            weights = torch.cat([p.reshape(-1) for p in measure.net_.parameters()])
            gathered = [torch.empty_like(weights) for _ in range(world)]
            dist.all_gather(gathered, weights)
            assert all(torch.equal(gathered[0], w) for w in gathered)  # every rank holds the same weights
    finally:
        dist.destroy_process_group()


def _collection(out: Path) -> Path:
    model = tiny_model("llama", num_layers=3, hidden=16, vocab=64, seed=0)
    ids = torch.randint(3, 64, (192,), generator=torch.Generator().manual_seed(0)).tolist()
    assert len(collect_to_disk(model, [ids], out, features=("delta", "lens_topk"), **COLLECT).shards) == 8
    return out


def test_two_gloo_ranks_fit_the_one_process_fit(tmp_path):
    data = _collection(tmp_path / "data")
    out = tmp_path / "fitted"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(data), str(out)), nprocs=2, join=True)
    ds = ShardDataset(data, batch_size=10, shuffle=True, seed=2)
    for key, (name, params, fit_kw) in FITS.items():
        parallel = load_measure(out / key)
        single = get_measure(name, **params).fit(ds, streams=fit_kw.get("streams", 2))
        one_stream = get_measure(name, **params).fit(ds)
        assert parallel.layers_ == single.layers_ and parallel.best_epoch_ == single.best_epoch_
        assert torch.equal(parallel.mean_, single.mean_) and torch.equal(parallel.std_, single.std_)
        # The same minibatches; only the order of float sums (gradients summed over the ranks) differs.
        for a, b in zip(parallel.net_.parameters(), single.net_.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert parallel.history_ == pytest.approx(single.history_, rel=1e-5)
        # Two streams are another batch order than one: the test can tell them apart.
        assert any(not torch.allclose(a, b) for a, b in zip(single.net_.parameters(), one_stream.net_.parameters()))
        assert sorted(p.name for p in (out / key).iterdir()) == ["measure.json", "measure.safetensors"]
        assert json.loads((out / key / "measure.json").read_text())["measure"] == name


SCRIPT = """
import sys, torch
from deltaexit.measures import get_measure
from deltaexit.streaming import ShardDataset, init_distributed_from_env
torch.set_num_threads(1)
owned = init_distributed_from_env()
measure = get_measure("delta-mlp", hidden_units=8, max_epochs=2, batch_size=16)
measure.fit(ShardDataset(sys.argv[1], batch_size=10)).save(sys.argv[2])
if owned:
    torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_a_torchrun_fit_equals_the_one_process_fit(tmp_path):
    data = _collection(tmp_path / "data")
    script = tmp_path / "fit.py"
    script.write_text(SCRIPT)
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(data), str(tmp_path / "out")]
    done = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    parallel = load_measure(tmp_path / "out")
    single = get_measure("delta-mlp", hidden_units=8, max_epochs=2, batch_size=16)
    single.fit(ShardDataset(data, batch_size=10), streams=2)
    for a, b in zip(parallel.net_.parameters(), single.net_.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
