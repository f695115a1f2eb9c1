"""Invariants of early-exit generate() on tiny random models (see docs/generate.md)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

import deltaexit as dx
from deltaexit.generation import DecayingThreshold, EarlyExit, PerLayerThreshold, Recompute, Verify, as_schedule
from deltaexit.generation.kv import cache_lengths
from deltaexit.generation.speculative import greedy_accept, residual_distribution, speculative_token
from deltaexit.measures.base import ConfidenceMeasure
from deltaexit.testing import ARCHITECTURES, ConstantScore, tiny_model

POLICIES = ("verify", "propagate", "recompute")
NEVER = math.inf


class LensMaxProb(ConfidenceMeasure):
    """Max softmax probability of the lens (a CALM-style measure, for tests)."""

    name = "test-lens-max-prob"
    needs_lens = True

    def score(self, state):
        return torch.softmax(state.logits.float(), dim=-1).max(dim=-1).values


class RandomScore(ConfidenceMeasure):
    """Uniform random scores from its own generator: exits at arbitrary layers."""

    name = "test-random"

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def score(self, state):
        return torch.rand(state.h_out.shape[:-1], generator=self.gen)


_MODELS: dict[str, torch.nn.Module] = {}


def model_of(arch: str, layers: int = 3) -> torch.nn.Module:
    key = f"{arch}-{layers}"
    if key not in _MODELS:
        _MODELS[key] = tiny_model(arch, num_layers=layers)
    return _MODELS[key]


def batch(seed: int = 0, rows: int = 2, length: int = 6, pad_left: int = 2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if rows > 1 and pad_left:
        mask[1, :pad_left] = 0
        ids[1, :pad_left] = 0
    return ids, mask


def reference(model, ids, mask, n, **kw):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)


class CountBlocks:
    """Counts completed block forwards (forward hooks do not fire for KV-only calls that stop early)."""

    def __init__(self, model):
        self.calls = 0
        blocks = dx.find_structure(model).blocks
        self.handles = [b.register_forward_hook(self._hook) for b in blocks]

    def _hook(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()


class CacheChecker(BaseStreamer):
    """A streamer that checks after every appended token that every layer's cache has one length."""

    def __init__(self, cache: DynamicCache):
        self.cache = cache
        self.puts = 0
        self.ended = False
        self.bad: list[list[int]] = []

    def put(self, value):
        self.puts += 1
        if self.puts > 1:  # the first put is the prompt, before any forward
            lengths = cache_lengths(self.cache)
            if len(set(lengths)) != 1:
                self.bad.append(lengths)

    def end(self):
        self.ended = True


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_never_exit_reproduces_generate_every_policy(arch):
    model = model_of(arch)
    ids, mask = batch()
    ref = reference(model, ids, mask, 8)
    for kv in POLICIES:
        # n-gram drafts would save blocks without any exit (tests/test_ngram_backoff.py): off here
        policy = Verify(ngram=0) if kv == "verify" else kv
        ee = EarlyExit(model, measure=LensMaxProb(), threshold=NEVER, kv=policy)
        out = ee.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), kv
        assert ((out.exit_layers == 3) | (out.exit_layers == 0)).all()
        assert out.stats.blocks_run == out.stats.full_depth_blocks


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_verify_is_lossless_for_any_measure(arch):
    model = model_of(arch)
    ids, mask = batch(seed=1)
    n = 20  # crosses the tiny sliding windows (8 for gpt_neo, 16 for mistral/gemma2)
    ref = reference(model, ids, mask, n)
    for measure, threshold in ((RandomScore(1), 0.4), (ConstantScore(1.0), 0.5), (LensMaxProb(), 0.01)):
        ee = EarlyExit(model, measure=measure, threshold=threshold, kv=Verify(num_draft=3))
        out = ee.generate(ids, attention_mask=mask, max_new_tokens=n, pad_token_id=0, return_dict_in_generate=True)
        assert torch.equal(out.sequences, ref), measure
        if not isinstance(measure, LensMaxProb):  # the lens of a random model is rarely confident
            assert out.stats.drafted > 0


def _verify_matches_model_generate(model, ids, mask, seed, threshold, num_draft, min_exit):
    """Greedy verify with a random measure: sequences, scores and logits as model.generate's; returns the output."""
    ref = _scored_reference(model, ids, mask, 10, do_sample=False)
    ee = EarlyExit(model, RandomScore(seed), threshold, Verify(num_draft=num_draft), min_exit_layer=min_exit)
    out = ee.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    assert torch.equal(out.sequences, ref.sequences)
    for mine, theirs in zip(out.scores + out.logits, ref.scores + ref.logits, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)  # the full model's, drafted or not
    return out


@settings(max_examples=8, deadline=None)
@given(
    layers=st.integers(2, 5),
    rows=st.integers(1, 3),
    length=st.integers(1, 7),
    pad=st.integers(0, 3),
    threshold=st.floats(0.0, 1.0),
    min_exit=st.integers(1, 2),
    num_draft=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_verify_lossless_property(layers, rows, length, pad, threshold, min_exit, num_draft, seed):
    model = model_of("llama", layers)
    ids, mask = batch(seed, rows, length, min(pad, length - 1))
    _verify_matches_model_generate(model, ids, mask, seed, threshold, num_draft, min(min_exit, layers))


@pytest.mark.parametrize("kv", POLICIES)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bloom", "gemma2"])
def test_blocks_run_match_exit_layers_and_caches_stay_aligned(arch, kv):
    model = model_of(arch, 4)
    ids, mask = batch(seed=2, rows=3)
    cache = DynamicCache()
    checker = CacheChecker(cache)
    counter = CountBlocks(model)
    try:
        ee = EarlyExit(model, RandomScore(2), 0.5, kv)
        out = ee.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            pad_token_id=0,
            cache=cache,
            streamer=checker,
            return_dict_in_generate=True,
        )
    finally:
        counter.close()
    assert checker.bad == [] and checker.ended
    assert len(set(cache_lengths(out.cache))) == 1
    stats = out.stats
    assert counter.calls == 4 + stats.blocks_run  # the prompt's forward + every block the loop ran
    exits = out.exit_layers[:, 1:]  # the first token comes from the prompt's full-depth forward
    assert ((exits >= 0) & (exits <= 4)).all()
    if kv == "propagate":
        # one forward per token, as deep as its deepest row
        assert stats.blocks_run == int(exits.max(dim=0).values.sum())
        assert stats.kv_only_calls == int((4 - exits.max(dim=0).values).sum())
    if kv == "recompute":
        assert stats.blocks_run == int(exits.max(dim=0).values.sum())
    assert stats.blocks_run < stats.full_depth_blocks or kv == "verify"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exit_token_comes_from_the_lens_at_the_exit_layer(arch):
    """With every token exiting after block 2 of 4, recompute decodes exactly with the 2-layer lens."""
    model = model_of(arch, 4)
    ids, _ = batch(seed=3, rows=1)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Recompute(max_pending=100), min_exit_layer=2)
    out = ee.generate(ids, max_new_tokens=6, return_dict_in_generate=True)
    assert (out.exit_layers[:, 1:] == 2).all()
    lens = dx.Lens.from_model(model)
    seq = ids
    with torch.no_grad():
        first = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, first[:, None]], dim=1)
        for _ in range(5):
            h2 = model(seq, output_hidden_states=True).hidden_states[2][:, -1]
            seq = torch.cat([seq, lens(h2).argmax(-1)[:, None]], dim=1)
    assert torch.equal(out.sequences, seq)


def test_propagate_skips_blocks_and_counts_them():
    model = model_of("llama", 4)
    ids, mask = batch(seed=4)
    counter = CountBlocks(model)
    try:
        ee = EarlyExit(model, ConstantScore(1.0), 0.5, "propagate", min_exit_layer=1)
        out = ee.generate(ids, attention_mask=mask, max_new_tokens=7, pad_token_id=0, return_dict_in_generate=True)
    finally:
        counter.close()
    assert (out.exit_layers[:, 1:] == 1).all()
    assert out.stats.blocks_run == 6 and counter.calls == 4 + 6
    assert out.stats.kv_only_calls == 6 * 3
    assert out.stats.implied_speedup == pytest.approx(4.0)


@pytest.mark.parametrize("kv", POLICIES)
def test_eos_rows_stop_and_are_padded(kv):
    model = model_of("llama")
    ids, mask = batch(seed=5)
    free = reference(model, ids, mask, 10)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 says this token at its third step
    ref = reference(model, ids, mask, 10, eos_token_id=eos)
    ee = EarlyExit(model, RandomScore(5), NEVER if kv != "verify" else 0.3, kv)
    out = ee.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=10,
        pad_token_id=0,
        eos_token_id=[eos, 127],
        return_dict_in_generate=True,
    )
    ref_list = reference(model, ids, mask, 10, eos_token_id=[eos, 127])
    assert torch.equal(out.sequences, ref_list) and torch.equal(ref, ref_list)
    row0 = out.sequences[0, ids.shape[1] :]
    stop = int((row0 == eos).nonzero()[0])
    assert (row0[stop + 1 :] == 0).all()
    assert (out.exit_layers[0, stop + 1 :] == 0).all() and (out.exit_layers[0, : stop + 1] > 0).all()


@pytest.mark.parametrize("kv", POLICIES)
def test_sampling_is_reproducible_with_a_seed(kv):
    model = model_of("llama")
    ids, mask = batch(seed=6)
    ee = EarlyExit(model, LensMaxProb(), 0.05, kv)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(
            ee.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=10,
                do_sample=True,
                temperature=0.8,
                top_k=50,
                top_p=0.95,
                pad_token_id=0,
            )
        )
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(124)
    other = ee.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0)
    assert other.shape == runs[0].shape


def test_sampling_never_exit_matches_generate_sampling():
    model = model_of("llama")
    ids, mask = batch(seed=7)
    torch.manual_seed(9)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    for kv in ("propagate", "recompute", "verify"):
        torch.manual_seed(9)
        out = EarlyExit(model, LensMaxProb(), NEVER, kv).generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0
        )
        assert torch.equal(out, ref), kv


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_bfloat16_model(arch):
    """A bfloat16 model (as on a GPU): never-exit and verify reproduce model.generate; scores come out in float32."""
    model = tiny_model(arch, num_layers=3).to(torch.bfloat16)
    ids, mask = batch(seed=1)
    ref = reference(model, ids, mask, 10)
    for kv in POLICIES:
        out = EarlyExit(model, LensMaxProb(), NEVER, kv).generate(
            ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0
        )
        assert torch.equal(out, ref), kv
    out = EarlyExit(model, RandomScore(3), 0.4, "verify").generate(
        ids, attention_mask=mask, max_new_tokens=10, pad_token_id=0
    )
    assert torch.equal(out, ref)
    out = EarlyExit(model, LensMaxProb(), 0.01, "propagate").generate(
        ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True, output_scores=True
    )
    assert out.scores[1].dtype == torch.float32 and (out.exit_layers[:, 1:] < 3).any()
    assert out.cache.layers[0].keys.dtype == torch.bfloat16


def _scored_reference(model, ids, mask, n, **kw):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=n,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **kw,
    )


@pytest.mark.parametrize("kv", POLICIES)
def test_scores_and_logits_match_generate_when_the_full_model_decides(kv):
    """output_scores / output_logits follow model.generate: never-exit for every policy, any measure for verify."""
    model = model_of("llama", 4)
    ids, mask = batch(seed=11)
    kw = dict(do_sample=False, repetition_penalty=1.3)  # a processor, so scores differ from logits
    ref = _scored_reference(model, ids, mask, 7, **kw)
    measures = [(LensMaxProb(), NEVER)] + ([(RandomScore(2), 0.3), (ConstantScore(1.0), 0.5)] if kv == "verify" else [])
    for measure, threshold in measures:
        policy = Verify(num_draft=3) if kv == "verify" else kv
        out = EarlyExit(model, measure, threshold, policy).generate(
            ids,
            attention_mask=mask,
            max_new_tokens=7,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            output_logits=True,
            **kw,
        )
        assert torch.equal(out.sequences, ref.sequences)
        assert len(out.scores) == len(out.logits) == len(ref.scores) == 7
        for mine, theirs in zip(out.scores, ref.scores):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        for mine, theirs in zip(out.logits, ref.logits):
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
        assert not torch.equal(out.scores[3], out.logits[3])  # processed vs raw


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_scores_are_those_the_exit_layer_chose_from(kv):
    """With exits after block 2 of 4, each token is the argmax of its reported scores, the 2-layer lens's logits
    (blocks 1-2 run for every token, so their states are the model's own under either policy)."""
    model = model_of("llama", 4)
    ids, _ = batch(seed=12, pad_left=0)
    policy = Recompute(max_pending=100) if kv == "recompute" else kv
    out = EarlyExit(model, ConstantScore(1.0), 0.5, policy, min_exit_layer=2).generate(
        ids, max_new_tokens=6, pad_token_id=0, return_dict_in_generate=True, output_scores=True
    )
    assert out.logits is None and len(out.scores) == 6
    new = out.sequences[:, ids.shape[1] :]
    assert torch.equal(torch.stack([s.argmax(-1) for s in out.scores], dim=1), new)
    lens = dx.Lens.from_model(model)
    with torch.no_grad():
        h2 = model(out.sequences[:, :-1], output_hidden_states=True).hidden_states[2]
    for i in range(1, 6):  # token i came from position prompt + i - 1 at layer 2
        expected = lens(h2[:, ids.shape[1] + i - 1]).float()
        torch.testing.assert_close(out.scores[i], expected, atol=1e-4, rtol=1e-4)


def test_output_is_a_transformers_generate_output():
    from transformers.generation import GenerateDecoderOnlyOutput

    model = model_of("llama")
    ids, mask = batch(seed=14)
    out = EarlyExit(model, ConstantScore(1.0), 0.5, "propagate").generate(
        ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True
    )
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and type(ref) is GenerateDecoderOnlyOutput
    assert torch.equal(out["sequences"], out.sequences) and torch.equal(out[0], out.sequences)
    assert set(ref.keys()) <= set(out.keys()) == {"sequences", "cache", "exit_layers", "stats"}
    assert out.stats.decode_steps == 2 and out["exit_layers"].shape == (2, 3)


def test_scores_need_return_dict_as_in_generate():
    model = model_of("llama")
    ids, mask = batch(seed=13)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, "propagate")
    seqs = ee.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, output_scores=True)
    assert isinstance(seqs, torch.Tensor)
    out = ee.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, seqs) and out.scores is None


def test_num_return_sequences_as_in_generate():
    model = model_of("llama")
    ids, mask = batch(seed=8)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, num_return_sequences=3, pad_token_id=0)
    torch.manual_seed(5)
    ref = model.generate(ids, **kw)
    assert ref.shape[0] == 6
    for kv in POLICIES:
        torch.manual_seed(5)
        assert torch.equal(EarlyExit(model, LensMaxProb(), NEVER, kv).generate(ids, **kw), ref), kv


def test_speculative_token_has_the_target_distribution():
    torch.manual_seed(0)
    vocab, n = 6, 200_000
    p = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.2, 0.0])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    draft = torch.multinomial(q, n, replacement=True)
    ok, token = speculative_token(draft, p.expand(n, vocab), q.expand(n, vocab))
    freq = torch.bincount(token, minlength=vocab).float() / n
    assert torch.allclose(freq, p, atol=0.005)
    assert (token[~ok] != 5).all()  # a resample never lands where p has no mass


def test_greedy_accept_and_residual():
    assert greedy_accept(torch.tensor([[1, 2, 3], [1, 9, 3]]), torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])).tolist() == [
        3,
        1,
    ]
    r = residual_distribution(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]]))
    assert torch.allclose(r, torch.tensor([[0.5, 0.5]]))


def test_custom_generate_and_streamer():
    model = model_of("gpt2")
    ids, mask = batch(seed=8)
    ee = EarlyExit(model, RandomScore(8), 0.5, "verify")
    kw = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0, custom_generate=ee.custom_generate)
    via_model = model.generate(ids, **kw)
    assert torch.equal(via_model, reference(model, ids, mask, 6))
    out = model.generate(ids, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, via_model) and out.exit_layers.shape == (2, 6)
    streamer = CacheChecker(DynamicCache())
    ee.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, streamer=streamer)
    assert streamer.puts == 1 + 6 and streamer.ended


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_beams": 2}, "beam"),
        ({"output_attentions": True, "return_dict_in_generate": True}, "output_attentions"),
        ({"use_cache": False}, "cache"),
    ],
)
def test_unsupported_options_raise(kwargs, match):
    model = model_of("llama")
    ids, _ = batch(rows=1)
    with pytest.raises(ValueError, match=match):
        EarlyExit(model, ConstantScore(), 0.5, "propagate").generate(ids, max_new_tokens=3, **kwargs)


@pytest.mark.parametrize("kv", POLICIES)
def test_stop_strings_as_in_generate(kv):
    """model.generate drops the tokenizer before a custom loop; EarlyExit.generate builds the criterion itself."""
    model, tok = dx.load_reference("v1")
    ids = tok("The game was", return_tensors="pt").input_ids
    free = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0)
    word = tok.decode(free[0, ids.shape[1] + 5 : ids.shape[1] + 6]).strip()
    ref = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=0, stop_strings=[word], tokenizer=tok)
    assert ref.shape[1] < free.shape[1]  # the stop string does stop it
    ee = EarlyExit(model, ConstantScore(1.0), NEVER, kv)
    out = ee.generate(ids, max_new_tokens=30, pad_token_id=0, stop_strings=[word], tokenizer=tok)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="tokenizer"):
        ee.generate(ids, max_new_tokens=30, pad_token_id=0, stop_strings=[word])


def test_assisted_decoding_is_refused():
    model = model_of("llama")
    ids, _ = batch(rows=1)
    ee = EarlyExit(model, ConstantScore(), 0.5, "verify")
    with pytest.raises(ValueError, match="assistant_model"):
        ee.generate(ids, max_new_tokens=3, assistant_model=model)
    with pytest.raises(ValueError, match="assistant_early_exit"):
        ee.generate(ids, max_new_tokens=3, assistant_early_exit=2)


def test_bad_arguments_raise():
    model = model_of("llama")
    with pytest.raises(ValueError, match="kv policy"):
        EarlyExit(model, ConstantScore(), 0.5, kv="skip")
    with pytest.raises(ValueError, match="min_exit_layer"):
        EarlyExit(model, ConstantScore(), 0.5, min_exit_layer=4)
    with pytest.raises(TypeError, match="ConfidenceMeasure"):
        EarlyExit(model, measure=3.0)
    with pytest.raises(KeyError, match="unknown measure"):
        EarlyExit(model, measure="no-such-measure")
    with pytest.raises(ValueError, match="per-layer"):
        EarlyExit(model, ConstantScore(), [0.5] * 4)
    with pytest.raises(ValueError, match="NaN"):
        EarlyExit(model, ConstantScore(), float("nan"))


def test_threshold_schedules():
    assert as_schedule(0.5, 3).values(0) == [0.5, 0.5, 0.5]
    assert PerLayerThreshold([0.1]).values(0, 3) == [0.1, NEVER, NEVER]
    calm = DecayingThreshold(0.9, tau=4.0, max_steps=10)
    values = [calm.values(t, 1)[0] for t in range(11)]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(0.91)
    model = model_of("llama")
    ids, _ = batch(rows=1)
    out = EarlyExit(model, ConstantScore(0.85), calm, "propagate").generate(
        ids, max_new_tokens=10, return_dict_in_generate=True
    )
    exits = out.exit_layers[0, 1:].tolist()
    # Constant 0.85 passes once the schedule has decayed below it (step 3: 0.81 + 0.1 * e^-1.2 = 0.84).
    assert exits[:2] == [3, 3] and exits[-1] == 1


def test_verify_sampling_matches_the_model_distribution():
    """20000 independent rows: the early-exit (t1, t2) joint and t3 marginal equal the model's exact ones."""
    model = tiny_model("llama", num_layers=3, vocab=8, seed=3)
    with torch.no_grad():  # make the deep layers matter, so layer-1 drafts are often wrong
        for block in model.model.layers[1:]:
            block.mlp.down_proj.weight.mul_(30.0)
    rows = 20_000
    prompt = torch.tensor([[5, 3, 6, 4]])
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1].float(), -1)  # [8]
        two = torch.cat([prompt.repeat(8, 1), torch.arange(8)[:, None]], dim=1)
        p2 = torch.softmax(model(two).logits[:, -1].float(), -1)  # [8, 8]
        joint = p1[:, None] * p2
        three = torch.cat([prompt.repeat(64, 1), torch.cartesian_prod(torch.arange(8), torch.arange(8))], dim=1)
        p3 = (joint.reshape(64, 1) * torch.softmax(model(three).logits[:, -1].float(), -1)).sum(0)
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, Verify(num_draft=2))  # every draft from layer 1
    torch.manual_seed(0)
    out = ee.generate(
        prompt.repeat(rows, 1),
        max_new_tokens=3,
        do_sample=True,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )
    assert out.stats.drafted > 0 and (out.exit_layers[:, 1:] < 3).any()
    kept = (out.exit_layers[:, 1] == 1).float().mean()  # rows whose layer-1 draft passed the test
    assert 0.05 < kept < 0.95
    new = out.sequences[:, 4:]
    emp_joint = torch.bincount(new[:, 0] * 8 + new[:, 1], minlength=64).float() / rows
    emp_t3 = torch.bincount(new[:, 2], minlength=8).float() / rows
    assert 0.5 * (emp_joint - joint.reshape(-1)).abs().sum() < 0.04
    assert 0.5 * (emp_t3 - p3).abs().sum() < 0.03


def test_verify_scores_of_finished_rows_match_model_generate():
    """A row that hit EOS is fed padding, in the drafts and in the rest of a verified chunk, as model.generate does
    (found by the lossless property: layers=3, rows=2, length=2, pad=1, threshold=0.0, num_draft=1, seed=505)."""
    out = _verify_matches_model_generate(model_of("llama", 3), *batch(505, 2, 2, 1), 505, 0.0, 1, 1)
    assert (out.exit_layers == 0).any()  # a row finished early: the case under test
