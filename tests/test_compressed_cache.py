"""Early exit on cache layers that cannot be cropped back (a model's own cache-layer classes, e.g. DeepSeek-V4's
compressed-attention layers: the last ``sliding_window - 1`` keys plus compressor buffers, entry counts and overlap
states): they are kept as *states*, snapshot whole and restored, and every policy still reproduces
``model.generate``."""

from __future__ import annotations

import functools

import pytest
import torch

from deltaexit.generation.checks import check_cache_support
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import cache_length, fresh_cache, has_kv, has_state, is_opaque
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.recurrent import restore, take_snapshot
from deltaexit.generation.verify import Verify
from deltaexit.shrink import tiny_model_for

NEW = 10  # past the sliding window (8) and several compressor windows (4 and 8 tokens)
IDS = torch.tensor([[5, 60, 7, 80, 9], [9, 100, 11, 120, 13]])


@functools.cache
def model():
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8}
    return tiny_model_for("deepseek_v4", compress_rates=rates).eval()


def generate(m, ee=None):
    common = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(IDS)}
    if ee is None:
        return m.generate(IDS, **common)
    return ee.generate(IDS, return_dict_in_generate=True, **common)


def tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    return []


def state(cache):
    """Every tensor and count each cache layer holds, by layer."""
    return [([t.clone() for t in tensors(vars(layer))], dict(layer.entry_count)) for layer in cache.layers]


def test_the_compressed_layers_are_states_not_croppable_key_value_layers():
    m = model()
    check_cache_support(m)  # no refusal
    cache = fresh_cache(m.config)
    assert cache.layers and all(is_opaque(layer) and has_state(layer) and not has_kv(layer) for layer in cache.layers)


def test_snapshot_restores_every_tensor_and_count_and_stays_valid():
    m = model()
    cache = fresh_cache(m.config)
    with torch.no_grad():
        m(IDS, cache=cache, use_cache=True)
        snap = take_snapshot(cache, IDS.shape[1])
        before = state(cache)
        for _ in range(2):
            m(IDS[:, :4], cache=cache, use_cache=True)  # closes compressor windows, moves the keys
            assert [c for _, c in state(cache)] != [c for _, c in before]
            restore(cache, snap)
            for (a, ca), (b, cb) in zip(state(cache), before, strict=True):
                assert ca == cb and len(a) == len(b)
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_verify_is_lossless_with_every_token_drafting():
    """(Never-exit reproduction under each policy is the support matrix's ``verify``/``propagate``/``recompute``
    cells.)"""
    m = model()
    reference = generate(m)
    policy = Verify(num_draft=3, ngram=0)
    out = generate(m, EarlyExit(m, "softmax-max", float("-inf"), policy, min_exit_layer=1, backoff=False))
    assert torch.equal(out.sequences, reference)
    assert out.stats.drafted > 0
    assert out.stats.accepted < out.stats.drafted  # drafts were rejected: the states were rolled back


@pytest.mark.filterwarnings("ignore:threshold -inf")
def test_recompute_leaves_the_full_models_states_and_propagate_runs_the_skipped_blocks():
    m = model()
    always = {"min_exit_layer": 1, "backoff": False}  # (a lens measure: the residual here is several streams)
    out = generate(m, EarlyExit(m, "softmax-max", float("-inf"), Recompute(max_pending=2), **always))
    assert (out.exit_layers[:, 1:] == 1).any() and out.stats.rounds > 0
    with torch.no_grad():
        fresh = m(out.sequences[:, : cache_length(out.cache)], use_cache=True).cache
    for (a, ca), (b, cb) in zip(state(out.cache), state(fresh), strict=True):
        assert ca == cb and len(a) == len(b)
        assert all(x.shape == y.shape and torch.allclose(x, y, atol=1e-4) for x, y in zip(a, b, strict=True))
    out = generate(m, EarlyExit(m, "softmax-max", float("-inf"), "propagate", **always))
    assert (out.exit_layers[:, 1:] == 1).all()
    assert out.stats.state_calls == (len(out.cache.layers) - 1) * (NEW - 1)  # whole blocks for the skipped layers
