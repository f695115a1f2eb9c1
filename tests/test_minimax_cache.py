"""Early exit on a model whose forward requires a cache class of its own: MiniMax's ``MiniMaxCache`` (a
``DynamicCache`` subclass whose Lightning-attention states live in a side list, ``linear_cache``, beside its layers).

Early exit builds that class (:func:`~deltaexit.generation.statecache.own_cache_class`), views the side list's
states as recurrent layers after the prompt (:func:`~deltaexit.generation.statecache.side_state_cache`) and crops
the key/value layers itself (``MiniMaxCache.crop`` raises, so any call to it fails these tests). Every policy must
reproduce ``model.generate`` token for token when no token exits, ``verify`` also when every token drafts."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import UnsupportedCacheError, cache_length, cache_lengths, has_state
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.recurrent import restore, take_snapshot
from deltaexit.generation.sidestate import SideStateLayer
from deltaexit.generation.statecache import own_cache_class, side_state_cache
from deltaexit.generation.verify import Verify
from deltaexit.testing import ConstantScore, hook_counts, tiny_model

NEW = 6
LAYOUTS = {
    "full-first": ["full_attention", "linear_attention", "full_attention", "linear_attention"],
    "linear-first": ["linear_attention", "full_attention", "linear_attention", "linear_attention"],
}


@functools.cache
def model_of(layout: str):
    config = AutoConfig.for_model(
        "minimax",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        block_size=4,
        layer_types=LAYOUTS[layout],
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def generate(model, ids, ee=None):
    common = {"max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0, "attention_mask": torch.ones_like(ids)}
    if ee is None:
        return model.generate(ids, **common)
    return ee.generate(ids, return_dict_in_generate=True, **common)


IDS = [torch.tensor([[5, 60, 7, 80, 9]]), torch.tensor([[9, 100, 11, 120, 3, 4, 5], [5, 6, 70, 8, 90, 10, 11]])]


def test_the_models_own_cache_class_is_found_from_its_forwards_annotations():
    assert own_cache_class(model_of("full-first")) is MiniMaxCache
    assert own_cache_class(tiny_model("llama")) is None  # transformers gives it a plain DynamicCache


@pytest.mark.parametrize(("layout", "ids"), list(zip(LAYOUTS, IDS, strict=True)), ids=["full-1", "linear-2"])
def test_every_policy_reproduces_generate_and_verify_is_lossless(layout, ids):
    model = model_of(layout)
    reference = generate(model, ids)
    for kv in ("verify", "recompute", "propagate"):
        out = generate(model, ids, EarlyExit(model, "softmax-max", float("inf"), kv, backoff=False))
        assert torch.equal(out.sequences, reference), (layout, kv)
        assert isinstance(out.cache, MiniMaxCache)
    ee = EarlyExit(model, "softmax-max", float("-inf"), Verify(num_draft=3), min_exit_layer=2, backoff=False)
    out = generate(model, ids, ee)
    assert torch.equal(out.sequences, reference), (layout, "verify always-exit")
    assert out.stats.drafted > 0
    assert len(set(cache_lengths(out.cache))) == 1
    assert hook_counts(model) == 0


def test_rejected_drafts_roll_the_side_states_back():
    model = model_of("full-first")
    ids, common = IDS[1], {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    ee = EarlyExit(model, "softmax-max", float("-inf"), Verify(num_draft=3, ngram=0), min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **common)
    assert out.stats.accepted < out.stats.drafted  # drafts were rejected: the linear states were rolled back
    assert torch.equal(out.sequences, model.generate(ids, **common))


def states(cache):
    """The linear-attention states and key/value tensors of a MiniMaxCache, by layer."""
    found = {i: [s] for i, s in enumerate(cache.linear_cache) if isinstance(s, torch.Tensor)}
    for i, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is not None:
            found.setdefault(i, []).extend([layer.keys, layer.values])
    return found


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_leaves_the_full_models_states_after_exits(layout):
    """Every token exits after block 1 and is held back: the cache afterwards is the one the full model makes over
    the tokens it holds (the side states were restored and advanced through the skipped blocks in order)."""
    model = model_of(layout)
    ids = IDS[0]
    ee = EarlyExit(model, ConstantScore(), 0.5, Recompute(max_pending=2), min_exit_layer=1, backoff=False)
    out = generate(model, ids, ee)
    assert (out.exit_layers[:, 1:] == 1).any()
    kept = cache_length(out.cache)
    with torch.no_grad():
        fresh = model(out.sequences[:, :1], use_cache=True).cache  # one-token steps, as model.generate's
        for i in range(1, kept):  # (positions given: MiniMaxCache counts a linear layer 0 as 0 tokens)
            model(out.sequences[:, i : i + 1], cache=fresh, use_cache=True, position_ids=torch.tensor([[i]]))
    ours, full = states(out.cache), states(fresh)
    assert ours.keys() == full.keys()
    for layer in ours:
        for a, b in zip(ours[layer], full[layer], strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max()))), layer


def test_propagate_keeps_every_layer_consistent_when_tokens_exit():
    model = model_of("full-first")
    ids = IDS[0]
    out = generate(model, ids, EarlyExit(model, ConstantScore(), 0.5, "propagate", min_exit_layer=1, backoff=False))
    assert (out.exit_layers[:, 1:] == 1).all()
    assert cache_lengths(out.cache) == [ids.shape[1] + NEW - 1] * 2
    assert all(isinstance(s, torch.Tensor) for s in out.cache.linear_cache[1::2])  # skipped states advanced


def test_custom_generate_builds_the_models_own_cache():
    """``model.generate`` prepares no cache for MiniMax: the custom loop builds the class its forward requires."""
    model = model_of("full-first")
    ids = IDS[0]
    ee = EarlyExit(model, "softmax-max", float("-inf"), "verify", backoff=False)
    out = model.generate(ids, custom_generate=ee.custom_generate, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(out, generate(model, ids))


class SideCache(DynamicCache):
    """A cache class of its own with a side list of per-block states (as MiniMax's)."""

    def __init__(self) -> None:
        super().__init__()
        self.side: list = []


def test_side_lists_are_viewed_as_recurrent_layers_that_snapshot_and_restore_in_place():
    cache = SideCache()
    _ = cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 1)  # block 1: keys/values, 3 tokens
    cache.side = [torch.zeros(1, 2), [], torch.ones(1, 2)]
    side_state_cache(cache, 4)
    assert [type(layer).__name__ for layer in cache.layers] == [
        "SideStateLayer",
        "DynamicLayer",
        "SideStateLayer",
        "DynamicLayer",
    ]
    assert [has_state(layer) for layer in cache.layers] == [True, False, True, False]
    snap = take_snapshot(cache, 3)
    cache.side[0] = torch.full((1, 2), 7.0)  # the model writes its side list
    assert cache.layers[0].recurrent_states[0].tolist() == [[7.0, 7.0]]
    restore(cache, snap)
    assert cache.side[0].tolist() == [[0.0, 0.0]] and cache.side[2].tolist() == [[1.0, 1.0]]
    assert isinstance(cache.layers[2], SideStateLayer)


def test_a_block_with_both_a_side_state_and_keys_values_is_refused():
    cache = SideCache()
    _ = cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    cache.side = [torch.zeros(1, 2)]
    with pytest.raises(UnsupportedCacheError, match="both keys/values and a state"):
        side_state_cache(cache, 2)
