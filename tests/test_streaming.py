"""Streaming collection to disk: content, sharding, subsample, resume, dataset, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import deltaexit as dx
from deltaexit.streaming import (
    Manifest,
    ManifestError,
    ShardDataset,
    batch_windows,
    collect_to_disk,
    iter_documents,
    load_features,
    token_windows,
)
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


FEATS = ("delta", "h_out", "delta_norm", "lens_topk")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=0)


def _docs(n: int = 12, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(3, 128, (k,), generator=g).tolist() for k in lengths]


def _run(model, docs, out, **kw):
    kw = {"context": 16, "batch_size": 3, "shard_tokens": 40, "progress": False, **kw}
    return collect_to_disk(model, docs, out, **kw)


# -- corpus ---------------------------------------------------------------------------------------
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=8),
    context=st.integers(1, 9),
    budget=st.one_of(st.none(), st.integers(1, 100)),
)
def test_windows_tile_the_documents_in_order(lengths, context, budget):
    docs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate(lengths)]
    windows = list(token_windows(docs, context, budget))
    flat = [t for d in docs for t in d]
    expected = flat if budget is None else flat[:budget]
    assert [t for w in windows for t in w.ids] == expected
    assert [w.index for w in windows] == list(range(len(windows)))
    assert all(1 <= len(w.ids) <= context for w in windows)
    nonempty = [d for d in docs if d]
    for w in windows:
        assert list(w.ids) == nonempty[w.doc][w.start : w.start + len(w.ids)]
    batches = list(batch_windows(windows, 3))
    assert [w for b in batches for w in b] == windows


def test_iter_documents_reads_text_with_a_tokenizer(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("ab c\n\n  \nd\n", encoding="utf-8")

    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    assert list(iter_documents(path, Chars())) == [[97, 98, 32, 99], [100]]
    with pytest.raises(ValueError, match="tokenizer"):
        list(iter_documents(path))
    with pytest.raises(FileNotFoundError):
        list(iter_documents(tmp_path / "missing.txt", Chars()))


# -- content --------------------------------------------------------------------------------------
def test_stored_features_match_a_direct_forward_of_each_window(model, tmp_path):
    docs = _docs()
    manifest = _run(model, docs, tmp_path / "o", features=FEATS, dtype=None, topk=3)
    data = load_features(tmp_path / "o")
    windows = list(token_windows(docs, 16))
    assert manifest.num_tokens == sum(len(d) for d in docs) == data["token_id"].shape[0]
    assert manifest.window_ids() == list(range(len(windows)))
    offset = 0
    for w in windows:
        n = len(w.ids)
        with dx.collect(model, ("delta", "h_out"), topk=3) as trace:
            model(input_ids=torch.tensor([w.ids]))
        sl = slice(offset, offset + n)
        assert data["window"][sl].eq(w.index).all() and data["doc"][sl].eq(w.doc).all()
        assert data["token_id"][sl].tolist() == list(w.ids)
        assert data["doc_position"][sl].tolist() == list(range(w.start, w.start + n))
        torch.testing.assert_close(data["delta"][sl], trace.delta[:, 0].transpose(0, 1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(data["h_out"][sl], trace.h_out[:, 0].transpose(0, 1), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(data["delta_norm"][sl], trace.delta[:, 0].norm(dim=-1).T, atol=1e-5, rtol=1e-4)
        assert torch.equal(data["topk_ids"][sl].long(), trace.topk_ids[:, 0].transpose(0, 1))
        offset += n


def test_shards_respect_the_size_and_the_manifest_describes_them(model, tmp_path):
    manifest = _run(model, _docs(), tmp_path / "o", features=("delta_norm",), shard_tokens=50)
    assert manifest.complete and len(manifest.shards) > 2
    for shard in manifest.shards[:-1]:
        assert shard["tokens"] >= 50
    for shard, path in zip(manifest.shards, manifest.shard_paths()):
        tensors = load_file(str(path))
        assert tensors["token_id"].shape[0] == shard["tokens"]
        covered = {w for a, b in shard["windows"] for w in range(a, b)}
        assert set(tensors["window"].tolist()) == covered
    manifest.verify()
    on_disk = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert on_disk["format"] == "deltaexit-stream" and on_disk["format_version"] == 1
    assert on_disk["settings"]["model"]["fingerprint"] == dx.streaming.model_fingerprint(model)
    assert Manifest.load(tmp_path / "o").to_dict() == manifest.to_dict()


def test_a_corrupt_shard_is_detected(model, tmp_path):
    manifest = _run(model, _docs(), tmp_path / "o", features=("delta_norm",))
    path = manifest.shard_paths()[1]
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ManifestError, match="corrupt"):
        manifest.verify()
    with pytest.raises(ManifestError, match="corrupt"):
        ShardDataset(tmp_path / "o", verify=True)


def test_subsample_is_a_deterministic_subset_of_the_full_run(model, tmp_path):
    docs = _docs(30)
    full = load_features(_run(model, docs, tmp_path / "full", features=("delta",)))
    a = load_features(_run(model, docs, tmp_path / "a", features=("delta",), subsample=0.3, seed=5))
    b = load_features(_run(model, docs, tmp_path / "b", features=("delta",), subsample=0.3, seed=5))
    c = load_features(_run(model, docs, tmp_path / "c", features=("delta",), subsample=0.3, seed=6))
    assert torch.equal(a["token_id"], b["token_id"]) and torch.equal(a["delta"], b["delta"])
    n_full, n_sub = full["token_id"].shape[0], a["token_id"].shape[0]
    assert 0.15 * n_full < n_sub < 0.45 * n_full
    assert not torch.equal(a["window"] * 1000 + a["doc_position"], c["window"] * 1000 + c["doc_position"])
    key_full = (full["doc"] * 10_000 + full["doc_position"]).tolist()
    index = {k: i for i, k in enumerate(key_full)}
    rows = torch.tensor([index[k] for k in (a["doc"] * 10_000 + a["doc_position"]).tolist()])
    assert torch.equal(full["delta"][rows], a["delta"])


def test_positions_last_keeps_the_last_token_of_each_window(model, tmp_path):
    docs = _docs()
    full = load_features(_run(model, docs, tmp_path / "all", features=("delta",)))
    last = load_features(_run(model, docs, tmp_path / "last", features=("delta",), positions="last"))
    windows = list(token_windows(docs, 16))
    assert last["window"].tolist() == [w.index for w in windows]
    assert last["doc_position"].tolist() == [w.start + len(w.ids) - 1 for w in windows]
    ends = torch.cumsum(torch.tensor([len(w.ids) for w in windows]), 0) - 1
    assert torch.equal(last["delta"], full["delta"][ends])


# -- resume ---------------------------------------------------------------------------------------
class Crash(RuntimeError):
    pass


def _assert_same_collection(a_dir, b_dir):
    a, b = Manifest.load(a_dir), Manifest.load(b_dir)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert [s["windows"] for s in a.shards] == [s["windows"] for s in b.shards]
    da, db = load_features(a), load_features(b)
    assert da.keys() == db.keys()
    for key in da:
        assert torch.equal(da[key], db[key]), key


@pytest.mark.parametrize("crash_after", [2])
def test_resume_after_a_failure_between_shards(model, tmp_path, crash_after):
    docs = _docs(20)
    _run(model, docs, tmp_path / "ref", features=FEATS)
    written = []

    def fail(entry):
        written.append(entry)
        if len(written) == crash_after:
            raise Crash

    with pytest.raises(Crash):
        _run(model, docs, tmp_path / "run", features=FEATS, on_shard=fail)
    with pytest.raises(FileNotFoundError, match="resume"):
        Manifest.load(tmp_path / "run")
    resumed = []
    _run(model, docs, tmp_path / "run", features=FEATS, on_shard=resumed.append)
    assert resumed[0]["index"] == crash_after  # started after the last complete shard
    _assert_same_collection(tmp_path / "ref", tmp_path / "run")


@pytest.fixture(scope="module")
def reference_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    _run(model, _docs(20), out, features=FEATS)
    return out


N_BATCHES = len(list(batch_windows(token_windows(_docs(20), 16), 3)))


@settings(max_examples=6)
@given(crash_at=st.integers(1, N_BATCHES))
def test_resume_after_a_failure_inside_any_forward(model, reference_dir, tmp_path_factory, crash_at):
    out = tmp_path_factory.mktemp("run")
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise Crash

    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(Crash):
            _run(model, _docs(20), out, features=FEATS)
    finally:
        handle.remove()
    _run(model, _docs(20), out, features=FEATS)
    _assert_same_collection(reference_dir, out)


def test_resume_redoes_a_stray_shard_and_removes_temporary_files(model, tmp_path):
    docs = _docs(20)
    _run(model, docs, tmp_path / "ref", features=FEATS)
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == 7:
            raise Crash

    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(Crash):
            _run(model, docs, tmp_path / "run", features=FEATS)
    finally:
        handle.remove()
    # A shard written but never recorded (killed before the manifest update) is redone.
    (tmp_path / "run" / "shard-r00000-00009.safetensors").write_bytes(b"junk")
    (tmp_path / "run" / ".shard-r00000-00002.safetensors.abc.tmp").write_bytes(b"junk")
    _run(model, docs, tmp_path / "run", features=FEATS)
    _assert_same_collection(tmp_path / "ref", tmp_path / "run")
    assert not list((tmp_path / "run").glob(".shard*"))


def test_resume_of_a_complete_run_is_a_no_op_and_other_settings_are_refused(model, tmp_path):
    docs = _docs()
    first = _run(model, docs, tmp_path / "o", features=("delta_norm",))
    again = []
    second = _run(model, docs, tmp_path / "o", features=("delta_norm",), on_shard=again.append)
    assert again == [] and second.to_dict() == first.to_dict()
    with pytest.raises(ManifestError, match="other settings"):
        _run(model, docs, tmp_path / "o", features=("delta_norm",), subsample=0.5)
    with pytest.raises(ManifestError, match="other settings"):
        _run(tiny_model("llama", num_layers=3, seed=1), docs, tmp_path / "o", features=("delta_norm",))
    redone = _run(model, docs, tmp_path / "o", features=("delta_norm",), subsample=0.5, overwrite=True)
    assert redone.settings["subsample"] == 0.5 and redone.num_tokens < first.num_tokens


def test_a_corrupt_shard_is_collected_again_on_resume(model, tmp_path):
    docs = _docs()
    _run(model, docs, tmp_path / "ref", features=("delta",))
    _run(model, docs, tmp_path / "run", features=("delta",))
    rank_manifest = Manifest.read(tmp_path / "run" / "manifest.rank00000.json")
    rank_manifest.complete = False
    rank_manifest.save()
    path = tmp_path / "run" / "shard-r00000-00001.safetensors"
    path.write_bytes(b"broken")
    with pytest.warns(UserWarning, match="corrupt"):
        _run(model, docs, tmp_path / "run", features=("delta",))
    _assert_same_collection(tmp_path / "ref", tmp_path / "run")


# -- dataset --------------------------------------------------------------------------------------
def test_dataset_batches_tokens_and_labels_match_the_in_memory_saturation(model, tmp_path):
    docs = _docs()
    _run(model, docs, tmp_path / "o", features=("delta", "lens_topk"), topk=2, dtype=None)
    whole = load_features(tmp_path / "o", labels=("next", "final"))
    batches = list(ShardDataset(tmp_path / "o", labels=("next", "final"), batch_size=17))
    assert all(b["token_id"].shape[0] == 17 for b in batches[:-1])
    for key in whole:
        assert torch.equal(torch.cat([b[key] for b in batches]), whole[key])
    one = next(iter(ShardDataset(tmp_path / "o", features=("delta",))))
    assert one["delta"].shape == (3, 32) and set(one) == {
        "delta",
        "token_id",
        "window",
        "doc",
        "doc_position",
    }
    sat = dx.saturation_from_topk(whole["topk_ids"].long().movedim(1, 0))
    assert torch.equal(whole["label_next"], sat.stable.T) and torch.equal(whole["label_final"], sat.saturated.T)
    # The labels agree with a direct in-memory collection of the first window.
    w = next(token_windows(docs, 16))
    with dx.collect(model, (), topk=2) as trace:
        model(input_ids=torch.tensor([w.ids]))
    direct = dx.saturation(trace)
    n = len(w.ids)
    assert torch.equal(whole["label_final"][:n], direct.saturated[:, 0].T)


def test_dataset_shuffle_and_workers_cover_every_token_once(model, tmp_path):
    _run(model, _docs(20), tmp_path / "o", features=("delta_norm",))
    ds = ShardDataset(tmp_path / "o", batch_size=8, shuffle=True, seed=3)
    ds.set_epoch(1)
    keys = torch.cat([b["window"] * 1000 + b["doc_position"] for b in ds])
    ordered = load_features(tmp_path / "o")
    expected = ordered["window"] * 1000 + ordered["doc_position"]
    assert not torch.equal(keys, expected)
    assert torch.equal(keys.sort().values, expected.sort().values)
    loader = torch.utils.data.DataLoader(ShardDataset(tmp_path / "o", batch_size=8), batch_size=None, num_workers=2)
    got = torch.cat([b["window"] * 1000 + b["doc_position"] for b in loader])
    assert torch.equal(got.sort().values, expected.sort().values)


def test_layer_states_and_labels_feed_measures(model, tmp_path):
    from deltaexit.streaming import layer_labels, layer_states

    _run(model, _docs(), tmp_path / "o", features=("h_in", "h_out", "delta", "lens_topk"), dtype=None)
    ds = ShardDataset(tmp_path / "o", labels=("next", "final"), batch_size=32)
    batch = next(iter(ds))
    states = layer_states(batch, ds.manifest)
    assert [s.layer for s in states] == [0, 1, 2] and all(s.num_layers == 3 for s in states)
    for row, state in enumerate(states):
        assert torch.equal(state.delta, batch["delta"][:, row])
        torch.testing.assert_close(state.h_out - state.h_in, state.delta, atol=1e-5, rtol=1e-5)
    assert [t.shape for t in layer_labels(batch, "next")] == [torch.Size([32])] * 2
    assert len(layer_labels(batch, "final")) == 3
    _run(model, _docs(), tmp_path / "d", features=("delta",))
    delta_only = ShardDataset(tmp_path / "d", batch_size=4)
    # A delta-only collection serves the measures that read the delta (issue 15); h_out names the feature to add.
    states = layer_states(next(iter(delta_only)), delta_only.manifest)
    assert states[0].delta.shape == (4, 32)
    with pytest.raises(ManifestError, match="--features delta,h_out"):
        _ = states[0].h_out


def test_labels_need_lens_topk_over_all_layers(model, tmp_path):
    _run(model, _docs(), tmp_path / "a", features=("delta_norm",))
    with pytest.raises(ManifestError, match="lens_topk"):
        ShardDataset(tmp_path / "a", labels="next")
    _run(model, _docs(), tmp_path / "b", features=("lens_topk",), layers=[0, 2])
    with pytest.raises(ManifestError, match="every block"):
        ShardDataset(tmp_path / "b", labels="final")
    with pytest.raises(ValueError, match="label"):
        ShardDataset(tmp_path / "b", labels="later")
    with pytest.raises(ManifestError, match="not in this collection"):
        ShardDataset(tmp_path / "b", features=("delta",))


# -- bad input ------------------------------------------------------------------------------------
def test_bad_input_is_refused_early(model, tmp_path):
    docs = _docs()
    with pytest.raises(ValueError, match="unknown feature"):
        _run(model, docs, tmp_path / "o", features=("deltas",))
    with pytest.raises(ValueError, match="subsample"):
        _run(model, docs, tmp_path / "o", subsample=0.0)
    with pytest.raises(IndexError, match="out of range"):
        _run(model, docs, tmp_path / "o", layers=[7])
    with pytest.raises(ValueError, match="no tokens"):
        _run(model, [[], []], tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        _run(model, docs, tmp_path / "o", dtype="float8")
    with pytest.raises(ValueError, match="integer tensor"):
        _run(model, torch.rand(2, 3), tmp_path / "o")
    with pytest.raises(FileNotFoundError):
        Manifest.load(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(tmp_path / "bad")


def test_shard_writer_round_trips_through_safetensors(tmp_path):
    from safetensors import safe_open

    from deltaexit.streaming.writer import save_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "i32": torch.randint(-9, 9, (7,), generator=g, dtype=torch.int32),
        "i64": torch.randint(-9, 9, (2, 2), generator=g),
        "flags": torch.rand(6, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],
    }
    save_safetensors(tensors, tmp_path / "a.safetensors", {"k": "v"})
    back = load_file(str(tmp_path / "a.safetensors"))
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"k": "v"}
    save_safetensors(tensors, tmp_path / "b.safetensors", {"k": "v"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with pytest.raises(TypeError, match="dtype"):
        save_safetensors({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors", {})


def test_collect_config_and_keywords_are_one_set_of_settings(model, tmp_path):
    from deltaexit.streaming import CollectConfig

    config = CollectConfig(context=16, batch_size=3, shard_tokens=40, progress=False, features="delta_norm")
    a = collect_to_disk(model, _docs(), tmp_path / "a", config)
    b = _run(model, _docs(), tmp_path / "b", features=("delta_norm",))
    assert a.settings == b.settings and [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    with pytest.raises(TypeError, match="unknown collect_to_disk setting"):
        collect_to_disk(model, _docs(), tmp_path / "c", shard_token=3)


@pytest.mark.parametrize("damage", ["pickle", "truncate", "same-size-garbage"])
def test_a_damaged_shard_read_without_verify_names_the_file(model, tmp_path, damage):
    """A pickle renamed to a shard, a cut-short shard or garbage of the same size: a ManifestError naming it."""
    manifest = _run(model, _docs(), tmp_path / "o", features=("delta_norm",))
    path = manifest.shard_paths()[1]
    size = path.stat().st_size
    if damage == "pickle":
        torch.save({"delta_norm": torch.zeros(3)}, path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        path.write_bytes(b"\xff" * size)
    with pytest.raises(ManifestError, match=path.name) as err:
        list(ShardDataset(tmp_path / "o", batch_size=4))
    assert "overwrite" in str(err.value)
    if damage != "same-size-garbage":  # a resized shard is caught by the size check before any batch
        batches = iter(ShardDataset(tmp_path / "o", batch_size=4))
        with pytest.raises(ManifestError, match="bytes, the manifest recorded"):
            next(batches)


def test_the_fingerprint_survives_save_pretrained_and_reload(model, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert dx.streaming.model_fingerprint(reloaded) == dx.streaming.model_fingerprint(model)
    with torch.no_grad():
        next(reloaded.parameters()).add_(1.0)
    assert dx.streaming.model_fingerprint(reloaded) != dx.streaming.model_fingerprint(model)
