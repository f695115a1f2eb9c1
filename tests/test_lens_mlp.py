"""The ``lens-mlp`` measure: lens summary features, the previous layer's lens handed on, fit/save/load."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deltaexit as dx
from deltaexit.evaluation import auroc
from deltaexit.measures import LayerState, get_measure, lens_features, load_measure
from deltaexit.measures.lens_features import LENS_FEATURE_NAMES, lens_features_chunked
from deltaexit.measures.lens_mlp import LensMLP
from deltaexit.testing import tiny_model
from deltaexit.threads import torch_threads

COL = {name: i for i, name in enumerate(LENS_FEATURE_NAMES)}


@given(shape=st.lists(st.integers(1, 3), min_size=1, max_size=2), seed=st.integers(0, 2**16))
def test_lens_features_read_the_lens_of_both_states(llama, shape, seed):
    lens = dx.Lens.from_model(llama)
    g = torch.Generator().manual_seed(seed)
    h_in = torch.randn(*shape, llama.config.hidden_size, generator=g) * 4
    h_out = h_in + torch.randn(*shape, llama.config.hidden_size, generator=g) * 2
    with torch.no_grad():
        x = lens_features(LayerState(layer=0, h_in=h_in, h_out=h_out, lens=lens))
        p, p_prev = lens.probs(h_out).float(), lens.probs(h_in).float()
    assert x.shape == (*shape, len(LENS_FEATURE_NAMES)) and torch.isfinite(x).all()
    top = p.topk(4, dim=-1)
    torch.testing.assert_close(x[..., :4], top.values, rtol=1e-4, atol=1e-6)
    gap = top.values[..., 0] - top.values[..., 1]
    torch.testing.assert_close(x[..., COL["p1_minus_p2"]], gap, rtol=1e-4, atol=1e-6)
    same = (p_prev.argmax(-1) == p.argmax(-1)).float()
    assert torch.equal(x[..., COL["prev_top1_same"]], same)
    torch.testing.assert_close(
        x[..., COL["prev_p_of_top1"]], p_prev.gather(-1, top.indices[..., :1])[..., 0], rtol=1e-4, atol=1e-6
    )
    assert (x[..., COL["entropy"]] >= -1e-5).all() and (x[..., COL["kl_to_prev"]] >= -1e-5).all()
    torch.testing.assert_close(x[..., COL["delta_norm"]], (h_out - h_in).norm(dim=-1), rtol=1e-4, atol=1e-5)
    assert (x[..., COL["cos_h_in_h_out"]].abs() <= 1 + 1e-6).all()


def test_lens_features_use_handed_on_logits_and_say_what_they_need(llama):
    lens = dx.Lens.from_model(llama)
    h = torch.randn(3, llama.config.hidden_size)
    handed = torch.zeros(3, lens.vocab_size)
    handed[:, 5] = 50.0  # a previous-layer lens that is sure of token 5
    with torch.no_grad():
        x = lens_features(LayerState(layer=1, h_in=h * 0.5, h_out=h, lens=lens, logits_in=handed))
        top1 = lens(h).argmax(-1)
    assert torch.equal(x[:, COL["prev_top1_same"]], (top1 == 5).float())
    with pytest.raises(ValueError, match="h_in"):
        lens_features(LayerState(layer=0, h_out=h, lens=lens))
    with pytest.raises(ValueError, match="lens"):
        lens_features(LayerState(layer=0, h_in=h, h_out=h))


def test_many_tokens_are_featurised_in_chunks_with_the_same_result(llama):
    lens = dx.Lens.from_model(llama)
    h = torch.randn(2, 5, llama.config.hidden_size)
    state = LayerState(layer=0, h_in=h, h_out=h * 1.5 + 1, lens=lens)
    with torch.no_grad():
        whole = LensMLP().raw_features(state)
        chunked = lens_features_chunked(LayerState(layer=0, h_in=h, h_out=h * 1.5 + 1, lens=lens), chunk=3)
    assert chunked.shape == whole.shape == (2, 5, len(LENS_FEATURE_NAMES))
    torch.testing.assert_close(chunked, whole)


def _lens_states(model, n_seq: int = 24, seq: int = 16, seed: int = 0):
    """States of every block on random text, and the label 'the lens top-1 is already final'."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n_seq, seq), generator=g)
    lens = dx.Lens.from_model(model)
    with torch.no_grad(), dx.collect(model, capture=("h_in", "h_out"), positions="all") as trace:
        model(input_ids=ids, use_cache=False)
    h_in, h_out = trace.tokens("h_in"), trace.tokens("h_out")
    num_layers = h_out.shape[0]
    with torch.no_grad():
        top1 = torch.stack([lens(h_out[i]).argmax(-1) for i in range(num_layers)])
    states = [
        LayerState(layer=i, h_in=h_in[i], h_out=h_out[i], num_layers=num_layers, lens=lens)
        for i in range(num_layers - 1)
    ]
    labels = [top1[i] == top1[-1] for i in range(num_layers - 1)]
    return states, labels


@pytest.fixture(scope="module")
def fitted_lens_mlp():
    model = tiny_model("llama", num_layers=4)
    states, labels = _lens_states(model)
    with torch_threads(1):  # fits repeat bit for bit at one thread
        m = get_measure("lens-mlp", max_epochs=20, batch_size=128).fit(states, labels)
    return m, states, labels, model


def test_lens_mlp_defaults_learns_and_round_trips(fitted_lens_mlp, tmp_path):
    m, states, labels, model = fitted_lens_mlp
    assert isinstance(m, LensMLP) and m.needs_lens and m.class_weight is None
    assert m.n_features_in_ == len(LENS_FEATURE_NAMES) and m.layers_ == (0, 1, 2)
    with torch.no_grad():
        for state, y in zip(states, labels):
            if 0 < float(y.float().mean()) < 1:
                assert auroc(m.score(state), y) > 0.7  # the lens's own agreement signal is in the features
    loaded = load_measure(m.save(tmp_path / "lm"), model=model)
    assert isinstance(loaded, LensMLP) and loaded.class_weight is None
    with torch.no_grad():
        for state in states:
            assert torch.equal(loaded.score(state), m.score(state))


def test_class_weight_is_an_option_and_checked():
    states, labels = _lens_states(tiny_model("llama", num_layers=3), n_seq=8)
    with torch_threads(1):
        a = get_measure("lens-mlp", max_epochs=2).fit(states, labels)
        b = get_measure("lens-mlp", max_epochs=2, class_weight="balanced").fit(states, labels)
    assert not torch.equal(a.score(states[0]), b.score(states[0]))
    assert get_measure("delta-mlp").class_weight == "balanced"
    with pytest.raises(ValueError, match="class_weight"):
        get_measure("lens-mlp", class_weight="auto")
    with pytest.raises(ValueError, match="lens"):
        get_measure("delta-mlp", features="lens")
    with pytest.raises(ValueError, match="lens features"):
        get_measure("lens-mlp", features="delta")


class Spy(LensMLP):
    """lens-mlp that checks every handed-on previous-layer lens against a fresh one."""

    name = "test-lens-mlp-spy"

    def score(self, state):
        self.calls += 1
        if state.cached_logits_in is not None:
            self.handed += 1
            torch.testing.assert_close(state.cached_logits_in, state.lens(state.h_in))
        return super().score(state)


def test_generation_hands_on_the_previous_layers_lens_and_verify_stays_lossless(fitted_lens_mlp):
    m, _, _, model = fitted_lens_mlp
    spy = Spy()
    spy.__dict__.update(m.__dict__)
    spy.calls = spy.handed = 0
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # 1e9: scored but never passed, so every scored block hands its lens on; inf: not scored at all,
    # so the block after it must get no (stale) hand-on; 0.0: real exits (verify must stay lossless).
    for threshold in ([1e9, 1e9, 1e9], [1e9, math.inf, 1e9], 0.0):
        for kv in ("verify", "recompute", "propagate"):
            ee = dx.EarlyExit(model, measure=spy, threshold=threshold, kv=kv)
            with torch.no_grad():
                out = ee.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
            if kv == "verify" or threshold != 0.0:
                assert torch.equal(out, ref), (kv, threshold)
    assert spy.calls > 0 and spy.handed > 0
    assert spy.handed < spy.calls  # the first scored block of a step computes its own
