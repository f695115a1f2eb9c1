"""Candidate-set lens decisions (``candidates=K``) and declared score ranges (``threshold_problem``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltaexit.analysis import AnalyzeConfig, build_measures, with_candidates
from deltaexit.evaluation import auroc, evaluate_measures
from deltaexit.exits import DecayingThreshold, PerLayerThreshold
from deltaexit.features import collect_states
from deltaexit.generation.cost import measure_block_fraction, measure_setup_block_fraction
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.lens import Lens
from deltaexit.measures import LayerState, available_measures, get_measure, measure_cost
from deltaexit.measures.base import ConfidenceMeasure, threshold_problem
from deltaexit.measures.candidates import carry_candidates
from deltaexit.measures.simple import SoftmaxMax
from deltaexit.structure import find_structure
from deltaexit.testing import ConstantScore, cached_tiny_model, tiny_model
from deltaexit.threads import torch_threads

CANDIDATE_MEASURES = ("softmax-max", "softmax-gap", "lens-mlp")
TRAINING_FREE = ("softmax-max", "softmax-gap", "state-cosine", "delta-norm", "delta-ratio")


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("llama", {}),
        ("gemma2", {"final_logit_softcapping": 0.5}),  # a cap small enough to bite
        ("granite", {}),  # logits_scaling divides the logits
        ("opt", {"word_embed_proj_dim": 16}),  # project_out after the final norm
        ("gpt2", {}),  # tied head
    ],
)
def test_candidate_logits_equal_the_matching_columns_of_the_full_lens(model_type, overrides):
    model = tiny_model(model_type, **overrides)
    lens = Lens.from_model(model)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, lens.structure.hidden_size, generator=g) * 4
    ids = torch.randint(0, lens.vocab_size, (2, 3, 7), generator=g)
    with torch.no_grad():
        full = lens(h)
        part = lens.candidate_logits(h, ids)
    assert part.shape == (2, 3, 7)
    torch.testing.assert_close(part, full.gather(-1, ids), rtol=1e-5, atol=1e-5)


def test_candidate_logits_with_a_scale_a_bias_and_a_transform():
    model = tiny_model("llama", hidden=32, vocab=64)
    head = model.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.normal_()
    model.lm_head = biased
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 32, generator=g)
    ids = torch.randint(0, 64, (5, 4), generator=g)
    for kwargs in ({"logit_scale": 0.5, "final_softcap": 2.0}, {"logit_transform": lambda x: x - x.mean(-1, True)}):
        structure = find_structure(model, validate=False, **kwargs)
        with torch.no_grad():
            torch.testing.assert_close(structure.candidate_logits(h, ids), structure.unembed(h).gather(-1, ids))


def test_candidate_logits_check_the_shapes():
    lens = Lens.from_model(cached_tiny_model("llama"))
    with pytest.raises(ValueError, match="leading dims"):
        lens.candidate_logits(torch.zeros(3, lens.structure.hidden_size), torch.zeros(2, 4, dtype=torch.long))


def _random_state(lens: Lens, n: int, seed: int, scale: float, layer: int = 0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, lens.structure.hidden_size, generator=g) * scale
    d = torch.randn(n, lens.structure.hidden_size, generator=g) * scale
    return LayerState(layer=layer, h_in=h, h_out=h + d, lens=lens, num_layers=4)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    seed=st.integers(0, 10_000),
    scale=st.floats(1e-3, 1e3),
    name=st.sampled_from(TRAINING_FREE),
    k=st.sampled_from([None, 2, 5, 127]),
)
def test_training_free_scores_lie_in_the_declared_range(n, seed, scale, name, k):
    lens = Lens.from_model(cached_tiny_model("llama"))
    kwargs = {"candidates": k} if k is not None and name.startswith("softmax") else {}
    measure = get_measure(name, **kwargs)
    low, high = measure.score_range
    first = _random_state(lens, n, seed, scale)
    later = _random_state(lens, n, seed + 1, scale, layer=1).take_from(first)
    with torch.no_grad():
        for state in (first, later):
            score = measure.score(state)
            assert score.shape == (n,)
            assert bool(((score >= low) & (score <= high)).all()), (name, k, score)


def test_every_built_in_measure_declares_a_range():
    built_in = (*TRAINING_FREE, "linear", "delta-mlp", "hdelta-mlp", "lens-mlp")
    assert set(built_in) <= set(available_measures())
    for name in built_in:
        measure = get_measure(name)
        low, high = measure.score_range
        assert low <= high
    assert get_measure("softmax-max").score_range == (0.0, 1.0)
    assert get_measure("state-cosine").score_range == (-1.0, 1.0)
    assert get_measure("delta-norm").score_range == (-math.inf, 0.0)
    assert get_measure("lens-mlp").score_range == (-math.inf, math.inf)  # a classifier logit


@pytest.mark.parametrize("bad", [0, -3, 1, True, 2.5, "64"])
def test_bad_candidate_counts_raise_and_say_what_to_pass(bad):
    with pytest.raises(ValueError, match="candidates"):
        get_measure("softmax-max", candidates=bad)
    with pytest.raises(ValueError, match="candidates"):
        get_measure("lens-mlp", candidates=bad)


def test_candidates_at_or_above_the_vocabulary_raise_early_and_at_first_score():
    model = cached_tiny_model("llama")  # vocab 128
    lens = Lens.from_model(model)
    for name in CANDIDATE_MEASURES:
        measure = get_measure(name, candidates=128)
        with pytest.raises(ValueError, match="smaller than the vocabulary"):
            measure.check_sizes(32, 128)
        with pytest.raises(ValueError, match="candidates < 128"):
            measure_cost(measure, model)
    with pytest.raises(ValueError, match="smaller than the vocabulary"):
        get_measure("softmax-max", candidates=500).score(_random_state(lens, 3, 0, 1.0))
    with pytest.raises(ValueError, match="candidates"):
        get_measure("lens-mlp", candidates=3)  # needs at least its 4 top-k features
    with pytest.raises(ValueError, match="candidates"):
        AnalyzeConfig(candidates=0)


def test_a_token_keeps_its_first_layer_candidates_and_later_layers_read_only_those_rows():
    lens = Lens.from_model(cached_tiny_model("llama"))
    measure = get_measure("softmax-gap", candidates=6)
    first = _random_state(lens, 4, 0, 2.0, layer=1)
    with torch.no_grad():
        measure.score(first)
        ids = first.candidates
        assert ids.shape == (4, 6) and first.cached_logits is not None  # the full lens, kept for an exit here
        torch.testing.assert_close(ids, lens(first.h_out).topk(6, dim=-1).indices)
        later = _random_state(lens, 4, 1, 2.0, layer=2).take_from(first)
        score = measure.score(later)
    assert later.candidates is ids and later.cached_logits is None  # never full logits made from candidates
    probs = torch.softmax(lens(later.h_out).gather(-1, ids), dim=-1).topk(2, dim=-1).values
    torch.testing.assert_close(score, probs[:, 0] - probs[:, 1])


def test_vocab_minus_one_candidates_rank_like_the_full_measure():
    model = cached_tiny_model("llama")
    lens = Lens.from_model(model)
    for name in ("softmax-max", "softmax-gap"):
        full, near = get_measure(name), get_measure(name, candidates=lens.vocab_size - 1)
        first = _random_state(lens, 200, 0, 1.0)
        later = _random_state(lens, 200, 1, 1.0, layer=1)
        with torch.no_grad():
            near.score(first)
            a, b = full.score(later), near.score(later.take_from(first))
        labels = a > a.median()
        assert abs(auroc(a, labels) - auroc(b, labels)) < 0.02
        assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.99


def test_offline_evaluation_carries_candidates_from_the_first_decision_layer():
    model = tiny_model("llama", num_layers=4, hidden=32, vocab=128)
    with torch_threads(1):
        states = collect_states(model, torch.arange(600) % 120 + 3, window=32)
        select, test = states.split_windows([0.5, 0.5])
        measures = {
            "softmax-max": get_measure("softmax-max"),
            "softmax-max@127": get_measure("softmax-max", candidates=127),
        }
        result = evaluate_measures(measures, select, test)
    full, near = (result["summary"][n]["mean_auroc"] for n in measures)
    assert abs(full - near) < 0.02
    decisions = test.decision_states("next")
    carried = carry_candidates(decisions, 16)
    assert all(s.candidates is carried[0].candidates for s in carried)


def test_lens_mlp_fits_and_scores_on_candidates_and_saves_them(tmp_path):
    model = cached_tiny_model("llama")
    lens = Lens.from_model(model)
    states = [_random_state(lens, 120, seed, 1.0, layer=seed) for seed in range(3)]
    labels = [s.h_out[:, 0] > 0 for s in states]
    measure = get_measure("lens-mlp", candidates=8, max_epochs=2)
    with torch_threads(1):
        measure.fit(states, labels)
    assert measure.display_name == "lens-mlp@8" and measure.get_params()["candidates"] == 8
    assert all(s.candidates is states[0].candidates for s in states)
    from deltaexit.measures import load_measure

    again = load_measure(measure.save(tmp_path / "m"))
    assert again.candidates == 8
    with torch.no_grad():
        torch.testing.assert_close(again.score(states[1]), measure.score(states[1]))


def test_candidate_cost_is_k_rows_per_decision_plus_one_full_head_per_token():
    model = tiny_model("llama", num_layers=2, hidden=64, vocab=4096)
    full = measure_cost(get_measure("softmax-max"), model)
    k64 = measure_cost(get_measure("softmax-max", candidates=64), model)
    assert k64["flops_per_decision"] == pytest.approx(2 * 64 * 64 + 5 * 64 + 3 * 64 + 64)
    assert k64["fraction_of_block"] < full["fraction_of_block"] / 30
    first_layer = k64["flops_per_decision"] + k64["setup_flops_per_token"]
    assert first_layer >= full["flops_per_decision"]  # the first scored layer reads the whole head
    lens_mlp = measure_cost(get_measure("lens-mlp", candidates=64), model)
    assert lens_mlp["setup_fraction_of_block"] > 0 and lens_mlp["fraction_of_block"] < 0.2
    sm = get_measure("softmax-max", candidates=64)
    assert measure_block_fraction(model, sm, 256) == pytest.approx(k64["fraction_of_block"])
    assert measure_setup_block_fraction(model, sm, 256) == pytest.approx(k64["setup_fraction_of_block"])


class _FirstLowThenHigh(SoftmaxMax):
    """Candidate softmax-max that never lets a token out at its first scored layer and always at the next."""

    name = "test-first-low"
    seen: list[LayerState]

    def __init__(self) -> None:
        super().__init__(candidates=8)
        self.seen = []

    def score(self, state: LayerState) -> torch.Tensor:
        first = state.candidates is None
        super().score(state)
        self.seen.append(state)
        return torch.full(state.h_out.shape[:-1], 0.0 if first else 1.0)


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_generation_hands_candidates_on_and_takes_the_exit_token_from_the_full_lens(kv):
    model = tiny_model("llama", num_layers=5, hidden=32, vocab=128)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "return_dict_in_generate": True}
    measure = _FirstLowThenHigh()
    with torch.no_grad():
        ours = EarlyExit(model, measure, 0.5, kv, min_exit_layer=2).generate(ids, **kw)
        # the same exits (after block 3) decided without candidates: the tokens must be identical
        plain = EarlyExit(model, ConstantScore(), 0.5, kv, min_exit_layer=3).generate(ids, **kw)
    assert ours.exit_layers[:, 1:].eq(3).all()
    assert torch.equal(ours.sequences, plain.sequences)
    pairs = [(a, b) for a, b in zip(measure.seen, measure.seen[1:]) if b.layer == a.layer + 1]
    assert pairs and all(b.candidates is a.candidates and b.cached_logits is None for a, b in pairs)


def test_verify_with_candidates_stays_lossless():
    model = tiny_model("llama", num_layers=4, hidden=32, vocab=128)
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        ours = EarlyExit(model, get_measure("softmax-max", candidates=8), 0.3, "verify").generate(ids, **kw)
        ref = model.generate(ids, **kw)
    assert torch.equal(ours, ref)


def test_analyze_names_candidate_rows():
    assert with_candidates(None, 64)[-3:] == ["softmax-max@64", "softmax-gap@64", "lens-mlp@64"]
    assert with_candidates(["delta-norm"], ()) == ["delta-norm"]
    built = build_measures(["softmax-gap@16", "lens-mlp@32"])
    assert built["softmax-gap@16"].candidates == 16 and built["lens-mlp@32"].candidates == 32
    with pytest.raises(ValueError, match="NAME@K"):
        build_measures(["softmax-max@many"])


# -- score ranges: threshold_problem ---------------------------------------------------------------------------


def test_threshold_problem_names_a_useful_value():
    message = threshold_problem(get_measure("delta-norm"), 0.9)
    assert message is not None and "never exits" in message and "-2" in message and "‖delta‖ <= 2" in message
    assert "softmax-max" in message
    assert "never exits" in threshold_problem(get_measure("softmax-max"), 1.5)
    assert "every token exit" in threshold_problem(get_measure("softmax-gap"), -0.5)
    assert "exactly 1" in threshold_problem(get_measure("state-cosine"), 1.0)


@pytest.mark.parametrize(
    ("name", "threshold"),
    [
        ("delta-norm", math.inf),
        ("delta-norm", -math.inf),
        ("delta-norm", -2.0),
        ("softmax-max", 0.9),
        ("softmax-max", [0.9, math.inf, -math.inf]),
        ("state-cosine", 0.99),
        ("lens-mlp", 12.0),
        ("linear", -40.0),
    ],
)
def test_threshold_problem_accepts_reachable_and_documented_values(name, threshold):
    assert threshold_problem(get_measure(name), threshold) is None


def test_threshold_problem_checks_each_value_of_lists_and_schedules():
    assert threshold_problem(get_measure("delta-norm"), [-1.0, 0.95]) is not None
    assert threshold_problem(get_measure("softmax-max"), PerLayerThreshold([0.5, 1.2])) is not None
    assert threshold_problem(get_measure("softmax-max"), DecayingThreshold(0.9)) is None
    assert threshold_problem(get_measure("delta-norm"), DecayingThreshold(0.9)) is not None
    assert threshold_problem(get_measure("softmax-max"), torch.tensor([0.5, 0.7])) is None
    with pytest.raises(TypeError, match="threshold"):
        threshold_problem(get_measure("softmax-max"), "high")


def test_a_measure_without_a_declared_range_has_no_threshold_problem():
    class Free(ConfidenceMeasure):
        name = "test-free-range"

        def score(self, state: LayerState) -> torch.Tensor:
            return state.h_out.sum(-1)

    assert Free.score_range == (-math.inf, math.inf)
    assert threshold_problem(Free(), 1e9) is None
