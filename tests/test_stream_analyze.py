"""Streamed evaluation and ``deltaexit analyze --shards``: agreement with the in-memory ``analyze``, error bounds,
bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deltaexit as dx
from _tiny_lm import tiny_text, tiny_tokenizer
from deltaexit.cli import main
from deltaexit.evaluation import auroc, average_precision, best_f1_threshold, binary_metrics
from deltaexit.features import collect_states, tokenize_text
from deltaexit.histogram import ScoreHistogram, bin_edge, score_bins
from deltaexit.stream_analysis import (
    TRAIN,
    SplitBatches,
    analyze_shards,
    collection_dataset,
    evaluate_collection,
    split_codes,
)
from deltaexit.stream_evaluation import LabelEvaluator, window_counts
from deltaexit.streaming import ManifestError, collect_to_disk
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

WINDOW, TEST_TOKENS, FIT_TOKENS = 16, 96, 160
MEASURES = ["softmax-max", "softmax-gap", "state-cosine", "delta-norm", "delta-ratio", "linear", "delta-mlp",
            "softmax-max@8"]  # fmt: skip


# -- histograms ------------------------------------------------------------------------------------------
scores_and_labels = st.integers(2, 300).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.integers(0, 12),
    )
)


@given(scores_and_labels)
def test_histogram_figures_lie_within_their_stated_bounds(data):
    scores, labels, bits = data
    s, y = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)
    h = ScoreHistogram(mantissa_bits=bits)
    for part in range(0, len(scores), 37):  # batch by batch
        h.add(s[part : part + 37], y[part : part + 37])
    if 0 < int(y.sum()) < y.numel():
        assert abs(h.auroc() - auroc(s, y)) <= h.auroc_bound() + 1e-12
    if int(y.sum()) > 0:
        assert abs(h.auprc() - average_precision(s, y)) <= h.auprc_bound() + 1e-12
    threshold, f1 = h.best_f1_threshold()
    assert f1 <= best_f1_threshold(s, y)[1] + 1e-12  # bin edges are a subset of the in-memory candidates
    exact = binary_metrics(s, y, threshold)  # at a bin edge the counts are exact
    assert h.binary_metrics(threshold) == pytest.approx(exact, nan_ok=True)
    assert exact["f1"] == pytest.approx(f1)


@given(scores_and_labels)
def test_full_resolution_histograms_are_exact(data):
    scores, labels, _ = data
    s, y = torch.tensor(scores, dtype=torch.float32), torch.tensor(labels)
    h = ScoreHistogram(mantissa_bits=23)
    h.add(s, y)
    if 0 < int(y.sum()) < y.numel():
        assert h.auroc() == pytest.approx(auroc(s, y), abs=1e-12)
        assert h.auprc() == pytest.approx(average_precision(s, y), abs=1e-12)
    assert h.best_f1_threshold() == pytest.approx(best_f1_threshold(s, y))


@given(st.floats(-(2.0**100), 2.0**100, allow_nan=False, width=32), st.integers(0, 23))
def test_a_bin_edge_is_the_smallest_value_of_its_bin(x, bits):
    b = int(score_bins(torch.tensor([x]), bits)[0])
    edge = bin_edge(b, bits)
    assert edge <= x and int(score_bins(torch.tensor([edge]), bits)[0]) == b
    below = float(torch.nextafter(torch.tensor(edge), torch.tensor(-math.inf)))
    assert int(score_bins(torch.tensor([below]), bits)[0]) < b


# -- streamed analyze against the in-memory one ----------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The in-memory analyze's tokens collected to shards as one document (so the windows coincide)."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", num_layers=4, hidden=32, vocab=len(tokenizer), seed=0)
    text = tiny_text(120)
    ids = tokenize_text(tokenizer, text, max_tokens=TEST_TOKENS + FIT_TOKENS)
    model_dir = tmp_path_factory.mktemp("model")
    model.save_pretrained(model_dir)  # before collecting: saving writes dtype/architectures into the config
    tokenizer.save_pretrained(model_dir)
    out = tmp_path_factory.mktemp("shards")
    collect_to_disk(model, [ids.tolist()], out, features="h_in,h_out,delta_norm,lens_topk", topk=2, context=WINDOW,
                    batch_size=2, shard_tokens=48, dtype="float32", progress=False)  # fmt: skip
    return model, tokenizer, text, out, model_dir


def _in_memory(corpus, labels):
    model, tokenizer, text, _, _ = corpus
    return dx.analyze(model, tokenizer, text, tokens=TEST_TOKENS, fit_tokens=FIT_TOKENS, window=WINDOW,
                      batch_size=2, labels=labels, measures=MEASURES, fit_kwargs={"max_epochs": 2})  # fmt: skip


def _streamed(corpus, labels, bits):
    model, _, _, out, _ = corpus
    return analyze_shards(out, model=model, tokens=TEST_TOKENS, labels=labels, measures=MEASURES,
                          fit_kwargs={"max_epochs": 2}, mantissa_bits=bits, batch_size=40)  # fmt: skip


def _nan(d):
    return {k: math.nan if v is None else v for k, v in d.items()}


def _assert_tables_agree(mem, got):
    assert got["tokens"] == mem["tokens"]
    for a, b in zip(mem["layers"], got["layers"]):
        assert b == pytest.approx(a, rel=1e-5)
    oracle = {k: v for k, v in mem["oracle"].items() if k not in ("per_layer", "topk_mean_layers")}
    assert {k: got["oracle"][k] for k in oracle} == pytest.approx(oracle, rel=1e-6)
    assert got["oracle"]["topk_mean_layers"] == pytest.approx(mem["oracle"]["topk_mean_layers"], rel=1e-6)
    for a, b in zip(mem["oracle"]["per_layer"], got["oracle"]["per_layer"]):
        assert b == pytest.approx(a, rel=1e-6)
    assert got["cost"] == mem["cost"]


@pytest.mark.parametrize("bits", [23, 6])
def test_streamed_analyze_agrees_with_the_in_memory_analyze(corpus, bits):
    labels = ("next", "final", "kept")
    mem, got = _in_memory(corpus, labels), _streamed(corpus, labels, bits)
    _assert_tables_agree(mem, got)
    for kind in labels:
        assert got["labels"][kind]["left_out"] == mem["labels"][kind]["left_out"]
        assert got["labels"][kind]["fitted"] == mem["labels"][kind]["fitted"]  # same tokens, same order: same fit
        for tm, tg in zip(mem["labels"][kind]["transitions"], got["labels"][kind]["transitions"]):
            for key in ("layer", "positive_rate", "change_rate", "trivial_f1"):
                assert tg[key] == pytest.approx(tm[key], rel=1e-12)
            for key in ("r_delta_change", "r_next_delta_change"):
                assert tg[key] == pytest.approx(tm[key], rel=1e-5, nan_ok=True)
            for name, m in tm["measures"].items():
                m, g = _nan(m), _nan(tg["measures"][name])  # json_clean wrote NaN as None
                for key in ("auroc", "auprc"):
                    slack = g[f"{key}_error_bound"] + 1e-9
                    assert math.isnan(m[key]) or abs(g[key] - m[key]) <= slack, (kind, name, key)
                assert g["selection_f1"] <= m["selection_f1"] + 1e-12
                if bits == 23:  # one bin per float32 score: the in-memory figures (lens top-k probs differ by ulps)
                    assert {k: g[k] for k in m} == pytest.approx(m, rel=1e-6, abs=1e-8, nan_ok=True), (kind, name)


@pytest.mark.parametrize(
    ("name", "kind", "params", "batch"),
    [
        ("delta-mlp", "final", {"hidden_units": 8}, 40),
        ("hdelta-mlp", "kept", {"hidden_units": 8, "per_layer": True}, 23),
        ("lens-mlp", "next", {"hidden_units": 8, "val_fraction": 0.3}, 64),
    ],
)
def test_split_batches_fit_equals_the_in_memory_analyze_fit(corpus, name, kind, params, batch):
    """analyze_shards' fit reads SplitBatches: the held-out tail tokens and the weights are the in-memory fit's."""
    model, tokenizer, text, out, _ = corpus
    ids = tokenize_text(tokenizer, text, max_tokens=TEST_TOKENS + FIT_TOKENS)
    lens = dx.Lens.from_model(model)
    train, _ = collect_states(model, ids[TEST_TOKENS:], window=WINDOW, batch_size=2).split_windows([0.8, 0.2])
    make = lambda: dx.get_measure(name, label=kind, max_epochs=2, **params)  # noqa: E731
    memory = make().fit(train.decision_states(kind), list(train.labels(kind)))
    manifest = dx.Manifest.load(out)
    codes = split_codes(window_counts(manifest), TEST_TOKENS)
    streamed = make()
    batches = SplitBatches(collection_dataset(manifest, batch), codes, TRAIN, streamed, kind, lens)
    streamed.fit(batches)
    held = batches.held_out_batches(params.get("val_fraction", 0.15))
    n_val = max(1, round(params.get("val_fraction", 0.15) * train.num_tokens))
    pieces = list(batches)
    assert sum(int(labels[0].shape[0]) for i, (_, labels) in enumerate(pieces) if i in held) == n_val
    assert held == list(range(held[0], len(pieces)))  # the tail, in corpus order
    assert torch.equal(streamed.mean_, memory.mean_) and torch.equal(streamed.std_, memory.std_)
    for p, q in zip(streamed.net_.state_dict().values(), memory.net_.state_dict().values()):
        assert torch.equal(p, q)
    assert streamed.best_epoch_ == memory.best_epoch_


@pytest.mark.parametrize("kind", ["next", "kept"])
def test_streamed_evaluation_of_fitted_measures_equals_evaluate_measures(corpus, kind):
    """The same fitted measures scored in memory (evaluate_measures) and batch by batch from the shards."""
    model, tokenizer, text, out, _ = corpus
    ids = tokenize_text(tokenizer, text, max_tokens=TEST_TOKENS + FIT_TOKENS)
    test = collect_states(model, ids[:TEST_TOKENS], window=WINDOW, batch_size=2)
    train, select = collect_states(model, ids[TEST_TOKENS:], window=WINDOW, batch_size=2).split_windows([0.8, 0.2])
    measures = {
        name: dx.get_measure(name, label=kind, max_epochs=2, hidden_units=8) for name in ("linear", "delta-mlp")
    }
    for m in measures.values():
        m.fit(train.decision_states(kind), list(train.labels(kind)))
    measures["softmax-max@8"] = dx.get_measure("softmax-max", candidates=8)
    mem = dx.evaluate_measures(measures, select, test, label=kind)
    manifest = dx.Manifest.load(out)
    codes = split_codes(window_counts(manifest), TEST_TOKENS)
    evaluator = LabelEvaluator(measures, kind, manifest.num_layers, mantissa_bits=23)
    evaluate_collection({kind: evaluator}, collection_dataset(manifest, 40), codes, dx.Lens.from_model(model))
    got = evaluator.result()
    for tm, tg in zip(mem["transitions"], got["transitions"]):
        for name, m in tm["measures"].items():
            m, g = _nan(m), _nan(tg["measures"][name])
            assert {k: g[k] for k in m} == pytest.approx(m, rel=1e-6, abs=1e-8, nan_ok=True), (kind, name)


def test_analyze_command_reads_shards(corpus, tmp_path, capsys):
    _, _, _, out, model_dir = corpus
    js = tmp_path / "r.json"
    args = ["analyze", "--shards", str(out), "--model", str(model_dir), "--tokens", str(TEST_TOKENS),
            "--label", "both", "--measures", "delta-norm,softmax-max", "--json", str(js), "--quiet"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "label 'final'" in printed and "AUROC" in printed and "error bound" in printed
    result = json.loads(js.read_text())
    assert result["config"]["shards"] == str(out) and result["tokens"]["test"] == TEST_TOKENS
    assert main(["analyze", "--data", str(js), "--tokens", "64"]) == 1  # a text needs the model to run
    assert "--data needs --model" in capsys.readouterr().err


# -- bad input -------------------------------------------------------------------------------------------
def test_a_measure_whose_inputs_were_not_collected_names_the_feature_to_add(tmp_path):
    model = tiny_model("llama", num_layers=3, hidden=32, vocab=64)
    out = tmp_path / "delta-only"
    collect_to_disk(model, [list(range(3, 63))] * 6, out, features="delta,lens_topk", topk=2, context=20,
                    progress=False)  # fmt: skip
    with pytest.raises(
        ManifestError, match=r"state-cosine reads \['h_in', 'h_out'\].*--features delta,lens_topk,h_in,h_out"
    ):
        analyze_shards(out, tokens=40, measures=["delta-norm", "state-cosine"])
    with pytest.raises(ManifestError, match=r"softmax-max@8 reads \['h_out'\].*--features delta,lens_topk,h_out"):
        analyze_shards(out, tokens=40, measures=["softmax-max@8"])
    # Without --measures the measures it cannot score are left out, each with the reason.
    result = analyze_shards(out, tokens=40, measures=None, fit_kwargs={"max_epochs": 1})
    left = result["labels"]["next"]["left_out"]
    assert (
        "--features delta,lens_topk,h_out" in left["linear(h)"] and "delta-norm" in result["labels"]["next"]["summary"]
    )
    assert result["layers"][0]["delta_ratio"] is None and result["layers"][0]["delta_norm"] > 0


def test_another_model_an_unfinished_collection_and_a_corrupt_shard_are_named(corpus, tmp_path):
    model, _, _, out, _ = corpus
    other = tiny_model("llama", num_layers=4, hidden=32, vocab=model.config.vocab_size, seed=1)
    with pytest.raises(ManifestError, match="reads the lens.*--model MODEL"):
        analyze_shards(out, tokens=TEST_TOKENS, measures=["softmax-max@8"])  # h_out is there, the lens is not
    with pytest.raises(ManifestError, match="another model"):
        analyze_shards(out, model=other, tokens=TEST_TOKENS, measures=["delta-norm"])
    wider = tiny_model("llama", num_layers=4, hidden=64, vocab=model.config.vocab_size)
    with pytest.raises(ManifestError, match="hidden size 32; this model has hidden size 64"):
        analyze_shards(out, model=wider, tokens=TEST_TOKENS, measures=["delta-norm"])
    with pytest.raises(ValueError, match=r"histogram-bits\) must lie in \[0, 23\]"):
        analyze_shards(out, tokens=TEST_TOKENS, measures=["delta-norm"], mantissa_bits=30)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.rank00000.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="did not finish; run it again"):
        analyze_shards(unfinished, tokens=TEST_TOKENS)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = sorted(broken.glob("shard-*.safetensors"))[-1]
    shard.write_bytes(b"x" * shard.stat().st_size)  # same size: only reading it shows
    with pytest.raises(ManifestError, match=shard.name):
        analyze_shards(broken, tokens=TEST_TOKENS, measures=["delta-norm"])
    shutil.rmtree(broken)
    shutil.copytree(out, broken)
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x7f" * 8  # the header still parses: only the sha256 shows it
    shard.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=f"{shard.name}.*sha256"):
        analyze_shards(broken, tokens=TEST_TOKENS, measures=["delta-norm"], verify=True)
