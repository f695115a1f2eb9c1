"""``dx.calibrate(shards=...)``: the exit table read from a collection equals the one the model computes, and the
streamed calibration equals the in-memory one on it; bad input is refused before any shard is read."""

from __future__ import annotations

import pytest
import torch

import deltaexit as dx
from deltaexit.calibration import InsufficientCalibrationData, exit_table
from deltaexit.calibration.stream import shard_exit_table, shard_losses, shard_windows
from deltaexit.streaming import ManifestError, collect_to_disk
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 12


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    model = tiny_model("llama", num_layers=4, hidden=32, vocab=64, seed=0)
    docs = [torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in range(30, 90, 3)]
    out = tmp_path_factory.mktemp("cal")
    collect_to_disk(model, docs, out, features="h_in,h_out,lens_topk", topk=2, context=CONTEXT, batch_size=3,
                    shard_tokens=100, dtype="float32", progress=False)  # fmt: skip
    windows = [d[i : i + CONTEXT] for d in docs for i in range(0, len(d), CONTEXT)]
    return model, out, windows


def _in_memory_table(model, windows, measure):
    width = max(len(w) for w in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, w in enumerate(windows):
        ids[i, : len(w)] = torch.tensor(w)
        mask[i, : len(w)] = 1
    return exit_table(model, ids, mask, measure, score_mask=mask.bool(), batch_size=8)


@pytest.mark.parametrize("measure", ["softmax-max", "state-cosine", "delta-norm"])
def test_the_collection_gives_the_exit_table_of_its_windows(collection, measure):
    model, out, windows = collection
    mem = _in_memory_table(model, windows, measure)
    got = shard_exit_table(out, measure, model=model)
    assert got.num_examples == mem.num_examples == len(windows)
    for name in ("top1", "example", "step", "reference"):
        assert torch.equal(getattr(got, name), getattr(mem, name)), name
    torch.testing.assert_close(got.scores, mem.scores, rtol=1e-5, atol=1e-6)


CASES = [("per-layer", "textual", 0.3), ("constant", "sequence", 0.6), ("constant", "risk", 0.3)]


@pytest.mark.parametrize(("schedule", "loss", "delta"), CASES)
def test_streamed_calibration_equals_the_in_memory_calibration(collection, schedule, loss, delta):
    _, out, _ = collection
    settings = dict(measure="delta-norm", delta=delta, epsilon=0.3, schedule=schedule, loss=loss, num_thresholds=8,
                    progress=False)  # fmt: skip
    table = shard_exit_table(out, "delta-norm")
    mem = dx.calibrate(table=table, **settings)
    got = dx.calibrate(shards=out, **settings)
    assert got.threshold is not None and got.index > 0  # something beyond never-exit was certified
    assert got.threshold == mem.threshold and got.candidates == mem.candidates and got.n == mem.n
    assert got.pvalues == mem.pvalues and got.risks == mem.risks
    assert got.info["num_examples"] == table.num_examples and got.backend == "shards"
    # the loss matrix is the table's losses, row by row
    thresholds = [0.0, -0.5, -2.0, float("-inf")]
    matrix = shard_losses(out, "delta-norm", thresholds, loss=loss)
    for row, t in zip(matrix, thresholds):
        assert torch.equal(row, table.losses(t, loss))


def test_bad_collections_and_measures_are_refused_before_reading(collection, tmp_path):
    model, out, _ = collection
    with pytest.raises(ManifestError, match=r"fitted on hidden size 16.*hidden size 32"):
        fitted = dx.get_measure("delta-mlp", hidden_units=4, max_epochs=1)
        h = torch.randn(64, 16)
        fitted.fit([dx.LayerState(layer=0, h_in=h, h_out=h + torch.randn(64, 16))], [torch.rand(64) > 0.5])
        dx.calibrate(shards=out, measure=fitted, delta=0.3, epsilon=0.3, progress=False)
    with pytest.raises(ValueError, match="drop prompts"):
        dx.calibrate(model, [torch.tensor([1, 2])], shards=out, measure="delta-norm", delta=0.3, epsilon=0.3)
    with pytest.raises(ValueError, match="must be fitted"):
        dx.calibrate(shards=out, measure=dx.get_measure("linear"), delta=0.3, epsilon=0.3, progress=False)
    with pytest.raises(ManifestError, match="reads the lens.*--model MODEL"):
        dx.calibrate(shards=out, measure=dx.get_measure("softmax-max", candidates=4), delta=0.3, epsilon=0.3)
    other = tiny_model("llama", num_layers=4, hidden=32, vocab=64, seed=1)
    with pytest.raises(ManifestError, match="another model"):
        dx.calibrate(shards=out, model=other, measure="softmax-max", delta=0.3, epsilon=0.3, progress=False)
    norms = tmp_path / "norms"
    collect_to_disk(model, [list(range(3, 40))], norms, features="delta_norm", context=CONTEXT, progress=False)
    with pytest.raises(ManifestError, match="--features delta_norm,lens_topk"):
        dx.calibrate(shards=norms, measure="delta-norm", delta=0.3, epsilon=0.3)
    with pytest.raises(InsufficientCalibrationData, match="calibration examples"):
        dx.calibrate(shards=out, measure="delta-norm", delta=0.01, epsilon=0.01, progress=False)
    assert shard_windows(dx.Manifest.load(out)).numel() > 0
