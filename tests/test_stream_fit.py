"""Out-of-core fitting from streamed shards (issue 15): equal to the in-memory fit, label kinds, bad input."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deltaexit.features import StateSet
from deltaexit.generation import EarlyExit
from deltaexit.lens import Lens
from deltaexit.measures import LayerState, get_measure, load_measure
from deltaexit.measures.fit import LayerStats
from deltaexit.measures.stream_fit import held_out_units
from deltaexit.streaming import (
    Manifest,
    ManifestError,
    ShardDataset,
    ShardFitSource,
    collect_to_disk,
    layer_states,
    load_features,
)
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD = 24  # tokens per shard: context 8, one window a batch, three batches a shard
FAST = {"max_epochs": 3, "batch_size": 32, "patience": 2}


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, hidden=16, vocab=64, seed=0)


def _ids(n: int = 192, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (n,), generator=g).tolist()]


def _collect(model, out, features=("h_in", "h_out", "delta", "lens_topk"), **kw):
    kw = {"context": 8, "batch_size": 1, "shard_tokens": SHARD, "topk": 2, "dtype": None, "progress": False, **kw}
    return collect_to_disk(model, _ids(), out, features=features, **kw)


@pytest.fixture(scope="module")
def full_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    manifest = _collect(model, out)
    assert len(manifest.shards) == 8 and all(s["tokens"] == SHARD for s in manifest.shards)
    return out


def _in_memory(out, lens=None) -> StateSet:
    """The same tokens, read into memory, as the in-memory pipeline (``analyze``) holds them."""
    data = load_features(out)
    return StateSet(
        h_in=data["h_in"].transpose(0, 1).contiguous(),
        h_out=data["h_out"].transpose(0, 1).contiguous(),
        topk_ids=data["topk_ids"].transpose(0, 1).long(),
        topk_probs=data["topk_probs"].transpose(0, 1),
        window=data["window"],
        lens=lens,
    )


def _same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.net_.state_dict().values(), b.net_.state_dict().values()))


@pytest.mark.parametrize(
    ("name", "label", "params"),
    [
        ("linear", "next", {}),
        ("delta-mlp", "final", {"hidden_units": 8}),
        ("hdelta-mlp", "kept", {"hidden_units": 8, "per_layer": True}),
        ("linear", "final", {"features": "h", "class_weight": None}),
        ("lens-mlp", "next", {"hidden_units": 8}),
    ],
)
def test_streamed_fit_equals_the_in_memory_fit_on_the_same_tokens(model, full_dir, name, label, params):
    manifest = Manifest.load(full_dir)
    val_fraction = SHARD / manifest.num_tokens  # the in-memory tail = the last shard
    lens = Lens.from_model(model)
    make = lambda: get_measure(name, label=label, val_fraction=val_fraction, **FAST, **params)  # noqa: E731
    states = _in_memory(full_dir, lens)
    memory = make().fit(states.decision_states(label), list(states.labels(label)))
    streamed = make().fit(ShardDataset(full_dir, batch_size=10), lens=lens)
    assert streamed.layers_ == memory.layers_
    assert torch.equal(streamed.mean_, memory.mean_) and torch.equal(streamed.std_, memory.std_)
    assert streamed.positive_rate_ == memory.positive_rate_
    assert _same_weights(streamed, memory)
    assert streamed.best_epoch_ == memory.best_epoch_
    # The held-out loss is summed chunk by chunk: the nets' float32 logits of other batch shapes may differ in the
    # last bit, so the history agrees to float32 rounding (it only decides when to stop: the same epoch here).
    assert streamed.history_ == pytest.approx(memory.history_, rel=1e-6)
    assert len(streamed.history_) > 1 and streamed.history_[1] != streamed.history_[0]  # it trained


def test_a_list_of_batches_fits_as_the_in_memory_fit(full_dir):
    states = _in_memory(full_dir)
    layers = states.decision_states("next")
    labels = list(states.labels("next"))
    n = states.num_tokens
    batches = [
        ([LayerState(layer=s.layer, h_in=s.h_in[i : i + 48], h_out=s.h_out[i : i + 48]) for s in layers],
         [y[i : i + 48] for y in labels])
        for i in range(0, n, 48)
    ]  # fmt: skip
    make = lambda: get_measure("delta-mlp", hidden_units=8, val_fraction=48 / n, **FAST)  # noqa: E731
    assert _same_weights(make().fit(batches), make().fit(layers, labels))
    with pytest.raises(TypeError, match="re-iterable"):
        make().fit(iter(batches))
    with pytest.raises(ValueError, match="at least 2"):
        make().fit(batches[:1])
    states1, labels1 = batches[1]
    h_out = states1[0].h_out.clone()
    h_out[3, 1] = float("nan")
    poisoned = [LayerState(layer=states1[0].layer, h_in=states1[0].h_in, h_out=h_out), *states1[1:]]
    with pytest.raises(ValueError, match="batch 1, layer 0: the states contain NaN"):
        make().fit([batches[0], (poisoned, labels1), *batches[2:]])
    with pytest.raises(TypeError, match="without y"):
        make().fit(ShardDataset(full_dir), labels)


class _Declared(list):
    """A list of batches that names its own held-out batches (BatchSource.split reads them)."""

    def __init__(self, batches, held):
        super().__init__(batches)
        self.held = held

    def held_out_batches(self, val_fraction):
        return self.held


def test_batches_that_declare_their_held_out_batches(full_dir):
    states = _in_memory(full_dir)
    layers, labels, n = states.decision_states("next"), list(states.labels("next")), states.num_tokens
    cut = n - 30  # the in-memory tail: the last 30 tokens, as two batches of 20 + 10
    bounds = [0, 48, 96, cut - 20, cut, n - 10, n]
    batches = [
        ([LayerState(layer=s.layer, h_in=s.h_in[a:b], h_out=s.h_out[a:b]) for s in layers], [y[a:b] for y in labels])
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip
    make = lambda: get_measure("delta-mlp", hidden_units=8, val_fraction=30 / n, **FAST)  # noqa: E731
    memory = make().fit(layers, labels)
    assert _same_weights(make().fit(_Declared(batches, [4, 5])), memory)
    assert not _same_weights(make().fit(_Declared(batches, [5])), memory)  # 10 held out, not 30: another fit
    for bad in ([], list(range(6)), [6]):
        with pytest.raises(ValueError, match="held_out_batches gave"):
            make().fit(_Declared(batches, bad))


def test_shuffled_buffers_and_streams_still_fit(full_dir):
    ds = ShardDataset(full_dir, batch_size=10, shuffle=True, seed=1)
    base = get_measure("delta-mlp", hidden_units=8, **FAST).fit(ds, progress=True)
    small = get_measure("delta-mlp", hidden_units=8, **FAST).fit(ds, shuffle_rows=40, streams=3)
    again = get_measure("delta-mlp", hidden_units=8, **FAST).fit(ds, shuffle_rows=40, streams=3)
    assert _same_weights(small, again)  # seeded: repeatable
    assert not _same_weights(small, base)
    assert torch.equal(small.mean_, base.mean_)  # the first pass does not depend on the order
    with pytest.raises(ValueError, match="streams"):
        get_measure("linear").fit(ds, streams=0)


@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), scale=st.floats(1e-3, 1e3), shift=st.floats(-50, 50))
def test_layer_statistics_do_not_depend_on_the_chunking(sizes, scale, shift):
    g = torch.Generator().manual_seed(len(sizes))
    x = torch.randn(sum(sizes), 5, generator=g) * scale + shift
    y = torch.rand(sum(sizes), generator=g) < 0.3
    whole, parts = LayerStats(1, 5), LayerStats(1, 5)
    whole.add(0, x, y)
    start = 0
    for n in sizes:
        parts.add(0, x[start : start + n], y[start : start + n])
        start += n
    a, b = whole.standardisation(), parts.standardisation()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and whole.rates() == parts.rates()
    torch.testing.assert_close(a[0][0], x.double().mean(0).float())
    torch.testing.assert_close(a[1][0], x.double().std(0, unbiased=False).float().clamp_min(1e-6), rtol=1e-5, atol=0)


@given(count=st.integers(2, 200), fraction=st.floats(0.01, 0.99))
def test_the_held_out_units_are_a_nonempty_tail(count, fraction):
    train, val = held_out_units(count, fraction, "shards")
    assert train + val == list(range(count)) and train and val
    assert len(val) == min(count - 1, max(1, round(fraction * count)))


# -- labels and layer states -----------------------------------------------------------------------
def test_dataset_yields_every_label_kind_aligned_with_the_in_memory_labels(full_dir):
    ds = ShardDataset(full_dir, labels=("next", "final", "kept"), batch_size=1000)
    batch = next(iter(ds))
    states = _in_memory(full_dir)
    assert torch.equal(batch["label_next"].T, states.labels("next"))
    assert torch.equal(batch["label_kept"].T, states.labels("kept"))
    assert torch.equal(batch["label_final"][:, :-1].T, states.labels("final"))
    assert bool(batch["label_final"][:, -1].all())
    source = ShardFitSource(ds, get_measure("linear", label="kept"))
    assert list(source.layers) == states.decision_layers("kept")
    measure = get_measure("hdelta-mlp", label="kept")
    by_measure = ShardDataset(full_dir, measure=measure, batch_size=8)
    assert by_measure.labels == ("kept",) and set(by_measure.features) == {"h_out", "delta"}


def test_layer_states_serve_a_delta_only_collection(model, tmp_path):
    out = tmp_path / "delta"
    _collect(model, out, features=("delta", "lens_topk"))
    ds = ShardDataset(out, batch_size=16)
    measure = get_measure("delta-mlp", hidden_units=8, **FAST).fit(ds)
    batch = next(iter(ds))
    states = layer_states(batch, ds.manifest, measure=measure)
    assert measure.score(states[0]).shape == (16,)
    assert get_measure("delta-norm").score(states[1]).shape == (16,)
    # The recipe's last step: generate with the measure fitted from shards (saved, loaded for this model).
    loaded = load_measure(measure.save(tmp_path / "measure"), model=model)
    ids = EarlyExit(model, loaded, 0.0, kv="verify").generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert ids.shape == (1, 7)
    with pytest.raises(ManifestError, match=r"deltaexit collect --features delta,lens_topk,h_out"):
        layer_states(batch, ds.manifest, measure=get_measure("hdelta-mlp"))
    with pytest.raises(ManifestError, match=r"reads \['h_out'\].*--features delta,lens_topk,h_out"):
        get_measure("linear", features="h").fit(ds)
    with pytest.raises(ManifestError, match="h_in"):
        get_measure("lens-mlp").fit(ds, lens=Lens.from_model(model))


# -- bad input -------------------------------------------------------------------------------------
def test_a_collection_from_another_model_or_hidden_size_is_refused_before_training(model, full_dir, tmp_path):
    ds = ShardDataset(full_dir, batch_size=10)
    other = tiny_model("llama", num_layers=3, hidden=16, vocab=64, seed=1)
    with pytest.raises(ManifestError, match="another model"):
        get_measure("linear").fit(ds, model=other)
    wider = tiny_model("llama", num_layers=3, hidden=32, vocab=64, seed=0)
    with pytest.raises(ManifestError, match="hidden size 16"):
        get_measure("linear").fit(ds, model=wider)
    with pytest.raises(ManifestError, match="lens"):
        get_measure("lens-mlp").fit(ds, lens=Lens.from_model(wider))
    with pytest.raises(ManifestError, match="reads the lens"):
        get_measure("lens-mlp").fit(ds)
    fitted = get_measure("linear", **FAST).fit(ds, model=model)
    _collect(wider, tmp_path / "wide", features=("delta", "lens_topk"))
    with pytest.raises(ManifestError, match="fitted on hidden size 16"):
        ShardDataset(tmp_path / "wide", measure=fitted)


def test_missing_features_and_labels_name_the_collect_command(model, tmp_path):
    _collect(model, tmp_path / "nolens", features=("delta",))
    with pytest.raises(ManifestError, match=r"lens top-k.*--features delta,lens_topk"):
        get_measure("linear").fit(ShardDataset(tmp_path / "nolens"))
    _collect(model, tmp_path / "one", features=("delta", "lens_topk"), shard_tokens=10_000)
    with pytest.raises(ValueError, match="at least 2"):
        get_measure("linear").fit(ShardDataset(tmp_path / "one"))


def test_an_unfinished_collection_is_refused(model, tmp_path):
    out = tmp_path / "o"
    _collect(model, out, features=("delta", "lens_topk"))
    path = out / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "complete": False}))
    with pytest.raises(ManifestError, match="incomplete"):
        get_measure("linear").fit(ShardDataset(out))
    path.unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardDataset(out)


def test_a_shard_corrupted_mid_epoch_is_named_and_nothing_is_fitted(model, tmp_path, monkeypatch):
    out = tmp_path / "o"
    manifest = _collect(model, out, features=("delta", "lens_topk"))
    victim = manifest.shard_paths()[2]
    read = ShardFitSource.chunks
    calls = {"n": 0}

    def chunks(self, units):
        calls["n"] += 1
        if calls["n"] == 9:  # the first pass (7 training shards, one call each) and the held-out pass are done
            size = victim.stat().st_size
            victim.write_bytes(b"\0" * size)  # same size: only reading it finds out
        return read(self, units)

    monkeypatch.setattr(ShardFitSource, "chunks", chunks)
    measure = get_measure("linear", **FAST)
    with pytest.raises(ManifestError, match=victim.name):
        measure.fit(ShardDataset(out, batch_size=10))
    assert not measure.is_fitted


@given(shuffle_rows=st.integers(1, 200), batch_size=st.integers(1, 50))
def test_the_shuffle_buffer_bounds_what_is_held_and_every_row_is_trained_once_an_epoch(shuffle_rows, batch_size):
    from deltaexit.measures import stream_fit
    from deltaexit.measures.fit import FitSettings

    g = torch.Generator().manual_seed(shuffle_rows)
    sizes = [7, 13, 1, 30, 9, 4]  # tokens per batch; 2 decision layers; the last batch is held out
    xs = [[torch.randn(n, 3, generator=g) for _ in range(2)] for n in sizes]
    ys = [[x[:, 0] > 0 for x in batch] for batch in xs]
    source = stream_fit.TensorSource(xs, ys, layers=(0, 1), hidden_size=3)
    buffers: list[int] = []
    randperm = torch.randperm

    def counting(n, *args, **kwargs):
        buffers.append(int(n))
        return randperm(n, *args, **kwargs)

    settings = FitSettings(hidden_units=0, max_epochs=2, batch_size=batch_size, patience=5)
    try:
        stream_fit.torch.randperm = counting  # type: ignore[assignment]
        stream_fit.fit_exit_net_stream(source, settings=settings, shuffle_rows=shuffle_rows)
    finally:
        stream_fit.torch.randperm = randperm  # type: ignore[assignment]
    train_rows = 2 * sum(sizes[:-1])
    biggest_chunk = 2 * max(sizes[:-1])
    assert max(buffers) <= max(shuffle_rows, biggest_chunk) + batch_size - 1  # never the whole corpus at once
    # Each epoch's buffers hold every training row once (a carried row counts in the next buffer again).
    per_epoch = len(buffers) // 2
    assert len(buffers) == 2 * per_epoch
    for epoch in range(2):
        sizes_seen = buffers[epoch * per_epoch : (epoch + 1) * per_epoch]
        carried = sum(sizes_seen) - train_rows
        assert 0 <= carried <= (len(sizes_seen) - 1) * (batch_size - 1)


def test_softmax_measures_score_from_the_stored_top_k_of_a_delta_only_collection(model, tmp_path):
    out = tmp_path / "delta"
    _collect(model, out, features=("delta", "lens_topk"))
    ds = ShardDataset(out, measure=get_measure("softmax-gap"), batch_size=16)
    assert ds.features == ("topk_probs",)
    batch = next(iter(ds))
    states = layer_states(batch, ds.manifest, measure=get_measure("softmax-max"))
    torch.testing.assert_close(get_measure("softmax-max").score(states[0]), batch["topk_probs"][:, 0, 0])
    with pytest.raises(ManifestError, match="h_out"):
        ShardDataset(out, measure=get_measure("softmax-max", candidates=8))
