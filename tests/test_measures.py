"""Confidence measures: registry, invariants (hypothesis), training, save/load, cost."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deltaexit as dx
from deltaexit.evaluation import auroc
from deltaexit.measures import (
    ConfidenceMeasure,
    LayerState,
    MeasureFileError,
    TrainableMeasure,
    available_measures,
    block_flops_per_token,
    get_measure,
    load_measure,
    measure_cost,
    register_measure,
)
from deltaexit.threads import torch_threads

BUILT_IN = (
    "softmax-max",
    "softmax-gap",
    "state-cosine",
    "delta-norm",
    "delta-ratio",
    "linear",
    "delta-mlp",
    "hdelta-mlp",
    "lens-mlp",
)
SIMPLE = ("state-cosine", "delta-norm", "delta-ratio")
TRAINABLE = (
    ("linear", {}),
    ("linear", {"features": "h"}),
    ("delta-mlp", {}),
    ("delta-mlp", {"per_layer": True}),
    ("hdelta-mlp", {}),
    ("hdelta-mlp", {"per_layer": True}),
)


def _state(n: int, d: int, seed: int, layer: int = 0, scale: float = 1.0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 3
    delta = torch.randn(n, d, generator=g) * scale
    return LayerState(layer=layer, h_in=h, h_out=h + delta, num_layers=4)


def _synthetic(num_layers: int = 3, n: int = 600, d: int = 8, seed: int = 0):
    """States whose label is 'the delta is small' (learnable from the delta alone)."""
    states, labels = [], []
    g = torch.Generator().manual_seed(seed)
    for layer in range(num_layers):
        h = torch.randn(n, d, generator=g)
        size = torch.rand(n, 1, generator=g) * 2 + 0.1
        delta = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1) * size
        states.append(LayerState(layer=layer, h_in=h, h_out=h + delta, num_layers=num_layers + 1))
        labels.append(size[:, 0] < 1.1)
    return states, labels


@pytest.fixture(scope="module")
def fitted():
    states, labels = _synthetic(n=800)
    out = {}
    for name, kwargs in TRAINABLE:
        m = get_measure(name, max_epochs=12, batch_size=256, **kwargs)
        with torch_threads(1):  # fits repeat bit for bit at one thread
            out[m.display_name] = m.fit(states, labels)
    return out, states, labels


def test_registry_has_every_built_in_measure():
    assert set(BUILT_IN) <= set(available_measures())
    for name in BUILT_IN:
        m = get_measure(name)
        assert isinstance(m, ConfidenceMeasure) and m.name == name
        assert m.higher_is_better
        assert isinstance(m.needs_lens, bool) and isinstance(m.requires_fit, bool)
        assert set(m.inputs) <= {"h_in", "h_out", "delta"}
        assert m.flops_per_token(64, 4096) > 0
    assert get_measure("softmax-max").needs_lens and not get_measure("delta-norm").needs_lens
    assert get_measure("delta-mlp").requires_fit and not get_measure("state-cosine").requires_fit


def test_duplicate_name_raises_and_unknown_name_lists_known():
    with pytest.raises(ValueError, match="already registered"):

        @register_measure
        class Again(ConfidenceMeasure):
            name = "delta-norm"

            def score(self, state):
                return state.h_out[..., 0]

    with pytest.raises(KeyError, match="delta-norm"):
        get_measure("no-such-measure")


@given(
    n=st.integers(1, 20),
    d=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    name=st.sampled_from(SIMPLE),
)
def test_simple_measures_are_finite_with_token_shape(n, d, seed, name):
    state = _state(n, d, seed)
    s = get_measure(name).score(state)
    assert s.shape == (n,)
    assert torch.isfinite(s).all()


@given(n=st.integers(1, 10), d=st.integers(1, 12), seed=st.integers(0, 2**16), c=st.floats(0.01, 100))
def test_delta_norm_scales_with_the_delta(n, d, seed, c):
    base = _state(n, d, seed)
    scaled = LayerState(layer=0, h_in=base.h_in, h_out=base.h_in + c * base.delta)
    m = get_measure("delta-norm")
    torch.testing.assert_close(m.score(scaled), c * m.score(base), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(-m.score(base), base.delta.norm(dim=-1), rtol=1e-5, atol=1e-6)
    assert (m.score(base) <= 0).all()


@given(
    n=st.integers(1, 10),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    a=st.floats(0.01, 100),
    b=st.floats(0.01, 100),
)
def test_state_cosine_in_range_and_scale_invariant(n, d, seed, a, b):
    state = _state(n, d, seed)
    m = get_measure("state-cosine")
    s = m.score(state)
    assert ((s >= -1) & (s <= 1)).all()
    scaled = LayerState(layer=0, h_in=a * state.h_in, h_out=b * state.h_out)
    torch.testing.assert_close(m.score(scaled), s, rtol=1e-4, atol=1e-4)
    same = LayerState(layer=0, h_in=state.h_in, h_out=state.h_in.clone())
    torch.testing.assert_close(m.score(same), torch.ones(n), rtol=0, atol=1e-5)


@given(n=st.integers(1, 10), d=st.integers(1, 12), seed=st.integers(0, 2**16), c=st.floats(0.01, 100))
def test_delta_ratio_is_invariant_to_joint_scaling(n, d, seed, c):
    state = _state(n, d, seed)
    m = get_measure("delta-ratio")
    scaled = LayerState(layer=0, h_in=c * state.h_in, h_out=c * state.h_out)
    torch.testing.assert_close(m.score(scaled), m.score(state), rtol=1e-4, atol=1e-5)
    expected = -state.delta.norm(dim=-1) / state.h_in.norm(dim=-1)
    torch.testing.assert_close(m.score(state), expected, rtol=1e-5, atol=1e-6)


@given(batch=st.integers(1, 3), seq=st.integers(1, 6), seed=st.integers(0, 2**16), layer=st.integers(0, 2))
def test_softmax_measures_in_unit_interval_and_match_precomputed_topk(llama, batch, seq, seed, layer):
    lens = dx.Lens.from_model(llama)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, llama.config.hidden_size, generator=g) * 4
    with torch.no_grad():
        state = LayerState(layer=layer, h_out=h, lens=lens)
        top = lens.topk(h, 2)[1]
        fast = LayerState(layer=layer, h_out=h, topk_probs=top)
        smax, sgap = get_measure("softmax-max"), get_measure("softmax-gap")
        for m in (smax, sgap):
            s = m.score(state)
            assert s.shape == (batch, seq)
            assert ((s >= 0) & (s <= 1)).all()
            torch.testing.assert_close(m.score(fast), s, rtol=1e-5, atol=1e-6)
        assert (sgap.score(state) <= smax.score(state) + 1e-6).all()
        torch.testing.assert_close(smax.score(state), lens.probs(h).amax(-1), rtol=1e-5, atol=1e-6)


def test_softmax_measure_without_lens_says_what_to_do():
    with pytest.raises(ValueError, match="lens"):
        get_measure("softmax-max").score(LayerState(layer=0, h_out=torch.randn(2, 4)))


def test_delta_measures_need_h_in():
    with pytest.raises(ValueError, match="h_in"):
        get_measure("delta-norm").score(LayerState(layer=0, h_out=torch.randn(2, 4)))


# -- trainable -------------------------------------------------------------------------------------


def test_trainable_measures_learn_a_learnable_label(fitted):
    measures, states, labels = fitted
    for name in ("delta-mlp", "delta-mlp/per-layer", "hdelta-mlp"):
        m = measures[name]
        assert m.is_fitted and m.layers_ == (0, 1, 2) and m.hidden_size_ == 8
        assert auroc(m.score(states[1]), labels[1]) > 0.9, name


@given(data=st.data())
def test_trainable_scores_are_finite_with_any_token_shape(fitted, data):
    measures, _, _ = fitted
    name = data.draw(st.sampled_from(sorted(measures)))
    shape = data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    layer = data.draw(st.integers(0, 2))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    h = torch.randn(*shape, 8, generator=g)
    s = measures[name].score(LayerState(layer=layer, h_in=h, h_out=h + torch.randn(*shape, 8, generator=g)))
    assert s.shape == tuple(shape)
    assert torch.isfinite(s).all()


def test_fit_is_deterministic_and_sets_fitted_attributes():
    states, labels = _synthetic(n=300)
    with torch_threads(1):  # fits repeat bit for bit at one thread
        a = get_measure("delta-mlp", max_epochs=3, seed=7).fit(states, labels)
        b = get_measure("delta-mlp", max_epochs=3, seed=7).fit(states, labels)
        c = get_measure("delta-mlp", max_epochs=3, seed=8).fit(states, labels)
    assert torch.equal(a.score(states[0]), b.score(states[0]))
    for attr in ("layers_", "hidden_size_", "n_features_in_", "mean_", "std_", "net_", "history_"):
        assert hasattr(a, attr)
    assert a.mean_.shape == (3, 8) and a.std_.shape == (3, 8)
    assert 0 <= a.best_epoch_ <= 3
    assert not torch.equal(a.score(states[0]), c.score(states[0]))


def test_fit_rejects_bad_input():
    states, labels = _synthetic(n=50)
    m = get_measure("delta-mlp", max_epochs=1)
    with pytest.raises(ValueError, match="label tensors"):
        m.fit(states, labels[:-1])
    with pytest.raises(ValueError, match="tokens"):
        m.fit(states[:1], [labels[0][:10]])
    bad = LayerState(layer=0, h_in=states[0].h_in, h_out=states[0].h_out.clone())
    bad.h_out[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        m.fit([bad], labels[:1])
    with pytest.raises(ValueError, match="features"):
        get_measure("linear", features="logits")
    with pytest.raises(RuntimeError, match="not fitted"):
        get_measure("delta-mlp").score(states[0])


def test_scoring_checks_hidden_size_and_layer(fitted):
    measures, _, _ = fitted
    m = measures["delta-mlp"]
    with pytest.raises(ValueError, match="hidden size"):
        m.score(_state(3, 9, 0))
    with pytest.raises(ValueError, match="layer"):
        m.score(_state(3, 8, 0, layer=5))


def test_save_load_round_trip_gives_identical_scores(fitted, tmp_path):
    measures, states, _ = fitted
    for i, (name, m) in enumerate(measures.items()):
        path = m.save(tmp_path / f"m{i}")
        loaded = load_measure(path, hidden_size=8)
        assert isinstance(loaded, TrainableMeasure) and loaded.display_name == name
        for state in states:
            assert torch.equal(loaded.score(state), m.score(state)), name
        config = json.loads((path / "measure.json").read_text())
        assert config["format_version"] == 1 and config["measure"] == m.name


def test_load_errors_are_clear(fitted, tmp_path, llama):
    measures, _, _ = fitted
    path = measures["delta-mlp"].save(tmp_path / "m")
    with pytest.raises(MeasureFileError, match="hidden size 8"):
        load_measure(path, hidden_size=16)
    with pytest.raises(MeasureFileError, match="hidden size"):
        load_measure(path, model=llama)  # hidden 32
    weights = path / "measure.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MeasureFileError, match="corrupt or truncated"):
        load_measure(path)
    # Without the checksum, safetensors' own parse error is translated.
    config = json.loads((path / "measure.json").read_text())
    del config["weights_sha256"]
    (path / "measure.json").write_text(json.dumps(config))
    with pytest.raises(MeasureFileError, match="corrupt or truncated"):
        load_measure(path)
    (path / "measure.json").write_text('{"format": "deltaexit-measure", "format_vers')
    with pytest.raises(MeasureFileError, match="JSON"):
        load_measure(path)
    config["format_version"] = 99
    (path / "measure.json").write_text(json.dumps(config))
    with pytest.raises(MeasureFileError, match="version"):
        load_measure(path)
    with pytest.raises(MeasureFileError, match="not found"):
        load_measure(tmp_path / "nothing")


def test_block_flops_match_a_hand_count():
    from deltaexit.testing import tiny_model

    model = tiny_model("llama", num_layers=2, hidden=32, heads=4, vocab=64)
    cfg = model.config
    d, f, kv = 32, cfg.intermediate_size, cfg.num_key_value_heads * 8
    by_hand = 2 * (d * d + 2 * d * kv + d * d) + 2 * 3 * d * f
    assert block_flops_per_token(model, context=0) == by_hand
    assert block_flops_per_token(model, context=10) == by_hand + 4 * 10 * 4 * 8
    cost = measure_cost(get_measure("softmax-max"), model, context=10)
    assert cost["fraction_of_block"] == pytest.approx(cost["flops_per_decision"] / cost["block_flops"])
    assert cost["flops_per_decision"] > 2 * 32 * 64


# -- declarations, parameters, the LayerState cache --------------------------------------------------


def test_params_come_from_the_signature_and_set_params_checks():
    import inspect

    for name in ("linear", "delta-mlp", "hdelta-mlp", "lens-mlp"):
        m = get_measure(name)
        signature = [p for p in inspect.signature(type(m).__init__).parameters if p != "self"]
        assert list(m.get_params()) == signature
        assert type(m)(**m.get_params()).get_params() == m.get_params()
    m = get_measure("linear")
    assert m.set_params(features="h") is m
    assert m.inputs == ("h_out",) and m.display_name == "linear(h)" and m.get_params()["features"] == "h"
    with pytest.raises(ValueError, match="no parameter"):
        m.set_params(hidden=3)
    with pytest.raises(ValueError, match="features"):
        m.set_params(features="logits")


def test_inputs_follow_the_parameters_and_needs_reads_them():
    assert get_measure("linear").inputs == ("delta",)
    assert get_measure("linear", features="h").inputs == ("h_out",)
    assert get_measure("delta-mlp", features="h+delta").inputs == ("h_out", "delta")
    m = get_measure("delta-norm")
    assert m.needs("delta") and m.needs("h_in") and not m.needs("h_out") and not m.needs("lens")
    lens_mlp = get_measure("lens-mlp")
    assert lens_mlp.needs("lens") and lens_mlp.needs("h_in") and lens_mlp.needs("h_out")
    assert get_measure("softmax-max").needs("lens") and not get_measure("softmax-max").needs("h_in")
    assert not get_measure("linear", features="h").needs("h_in")
    with pytest.raises(ValueError, match="needs"):
        m.needs("logits")


def test_registration_checks_the_declarations():
    with pytest.raises(ValueError, match="higher = safer"):

        @register_measure
        class Lower(ConfidenceMeasure):
            name = "test-lower-is-better"
            higher_is_better = False

            def score(self, state):
                return state.h_out[..., 0]

    with pytest.raises(ValueError, match="inputs"):

        @register_measure
        class Odd(ConfidenceMeasure):
            name = "test-odd-inputs"
            inputs = ("logits",)

            def score(self, state):
                return state.h_out[..., 0]

    assert "test-lower-is-better" not in available_measures() and "test-odd-inputs" not in available_measures()


def test_layer_state_keeps_a_public_logits_cache(llama):
    lens = dx.Lens.from_model(llama)
    h = torch.randn(3, llama.config.hidden_size)
    handed = torch.randn(3, lens.vocab_size)
    with torch.no_grad():
        state = LayerState(layer=1, h_in=h, h_out=2 * h, lens=lens, logits_in=handed)
        assert state.cached_logits is None and state.cached_logits_in is handed
        assert state.logits_in is handed
        logits = state.logits
    assert state.cached_logits is logits
    torch.testing.assert_close(logits, lens(2 * h))
    given_logits = LayerState(layer=1, h_out=h, logits=handed)  # no lens needed when the logits are given
    assert given_logits.logits is handed
