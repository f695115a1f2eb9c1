"""Early-exit generation on indexed cache layers (DeepSeek Sparse Attention: ``transformers``' ``DynamicIndexedLayer``,
keys/values plus the lightning indexer's keys per position): every policy reproduces ``model.generate`` when no token
exits, ``verify`` also when every token drafts, the indexer keys are cropped, viewed and written by ``propagate``'s
K/V-only calls together with the keys/values, and ``recompute`` leaves the full model's cache."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import DynamicIndexedLayer

from _tiny_lm import CallCounter
from deltaexit.generation.early_exit import EarlyExit
from deltaexit.generation.kv import cache_length, cache_view, crop_cache, fresh_cache, store_kv_only
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.verify import Verify
from deltaexit.testing import ConstantScore

#: A tiny DeepSeek-V3.2: the indexer keeps 3 keys per query, fewer than the sequences hold, so its selection matters.
#: Its 8 indexer heads make exact ties between indexer scores rare: a score is a sum of ReLUs, exactly 0 when every
#: head's is, and ``topk`` breaks ties differently in passes of different lengths (in ``transformers`` itself, with 2
#: heads a multi-token pass already differs from one-token steps).
FIELDS = {
    "vocab_size": 128,
    "hidden_size": 32,
    "intermediate_size": 64,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 8,
    "head_dim": 8,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "index_topk": 3,
    "index_head_dim": 16,
    "index_n_heads": 8,
    "pad_token_id": 0,
    "eos_token_id": 2,
}
NEW = 6
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def model():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("deepseek_v32", **FIELDS)).eval()


def generate(m, ids, ee=None, new=NEW):
    common = {"max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    if ee is None:
        return m.generate(ids, attention_mask=torch.ones_like(ids), **common)
    return ee.generate(ids, attention_mask=torch.ones_like(ids), return_dict_in_generate=True, **common)


prompt = st.integers(1, 2).flatmap(
    lambda rows: st.integers(3, 6).flatmap(
        lambda n: st.lists(st.integers(3, 127), min_size=rows * n, max_size=rows * n).map(
            lambda ids: torch.tensor(ids, dtype=torch.long).reshape(rows, n)
        )
    )
)
few = settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def indexed_lengths(cache):
    """Per layer: (key/value length, indexer-key length)."""
    return [(layer.get_seq_length(), layer.indexer_keys.shape[1]) for layer in cache.layers]


def test_the_sequences_are_longer_than_the_indexer_selection():
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = model()(ids, use_cache=True)
    assert all(isinstance(layer, DynamicIndexedLayer) for layer in out.cache.layers)
    assert model().config.index_topk < ids.shape[1] + NEW  # the selection drops keys: the indexer keys matter


@few
@given(ids=prompt, min_exit=st.integers(1, 2), num_draft=st.integers(1, 3))
def test_every_policy_reproduces_generate_and_verify_is_lossless(ids, min_exit, num_draft):
    m = model()
    reference = generate(m, ids)
    for kv in ("verify", "recompute", "propagate"):
        out = generate(m, ids, EarlyExit(m, "softmax-max", float("inf"), kv, backoff=False))
        assert torch.equal(out.sequences, reference), kv
    drafting = EarlyExit(
        m, "softmax-max", float("-inf"), Verify(num_draft=num_draft, ngram=0), min_exit_layer=min_exit, backoff=False
    )
    out = generate(m, ids, drafting)
    assert torch.equal(out.sequences, reference), "verify always-exit"
    if out.sequences.shape[1] > ids.shape[1] + 1:
        assert out.stats.drafted > 0
    n = cache_length(out.cache)
    assert all(lengths == (n, n) for lengths in indexed_lengths(out.cache))


def test_rejected_drafts_crop_the_indexer_keys_too():
    m = model()
    ids = torch.tensor([[5, 60, 7, 80], [9, 100, 11, 120]])
    out = generate(m, ids, EarlyExit(m, "softmax-max", float("-inf"), Verify(num_draft=3, ngram=0), backoff=False), 10)
    assert out.stats.accepted < out.stats.drafted  # drafts were rejected: the deep layers were cropped back
    assert torch.equal(out.sequences, generate(m, ids, new=10))
    n = cache_length(out.cache)
    assert all(lengths == (n, n) for lengths in indexed_lengths(out.cache))


def test_propagate_writes_the_indexer_keys_and_stops_after_them():
    m = model()
    ids = torch.tensor([[5, 6, 7, 8]])
    counter = CallCounter(layer.mlp for layer in m.model.layers)  # a K/V-only call stops before the MLP
    try:
        out = generate(m, ids, EarlyExit(m, ConstantScore(), 0.5, "propagate", min_exit_layer=1, backoff=False))
    finally:
        counter.close()
    assert (out.exit_layers[:, 1:] == 1).all()
    layers = m.config.num_hidden_layers
    assert out.stats.kv_only_calls == (layers - 1) * (NEW - 1)
    assert counter.calls == layers + (NEW - 1)  # the prompt's forward, then block 0 per token: none in K/V-only calls
    n = cache_length(out.cache)
    assert n == ids.shape[1] + NEW - 1
    assert all(lengths == (n, n) for lengths in indexed_lengths(out.cache))
    # the skipped layers' indexer keys are those the block makes from the exit state: the full prompt's for the prompt
    with torch.no_grad():
        full = m(ids, use_cache=True).cache
    for ours, theirs in zip(out.cache.layers, full.layers, strict=True):
        assert torch.allclose(ours.indexer_keys[:, : ids.shape[1]], theirs.indexer_keys, atol=1e-6)


def test_store_kv_only_needs_the_keys_values_write():
    m = model()
    cache = fresh_cache(m.config)

    def no_write():
        return None

    with pytest.raises(ValueError, match="without storing keys/values"):
        store_kv_only(cache, 1, no_write)
    assert "update" not in vars(cache) and "update_indexer" not in vars(cache)  # the cache's methods are its own


@pytest.mark.parametrize("max_pending", [1, 3])
def test_recompute_with_exits_leaves_the_full_models_cache(max_pending):
    m = model()
    ids = torch.tensor([[5, 60, 7, 80]])
    policy = Recompute(max_pending=max_pending)
    out = generate(m, ids, EarlyExit(m, ConstantScore(), 0.5, policy, min_exit_layer=1, backoff=False))
    assert out.stats.rounds > 0  # tokens exited and were held back
    kept = cache_length(out.cache)
    with torch.no_grad():
        full = m(out.sequences[:, :kept], use_cache=True).cache
    for ours, theirs in zip(out.cache.layers, full.layers, strict=True):
        assert ours.indexer_keys.shape == theirs.indexer_keys.shape
        assert torch.allclose(ours.indexer_keys, theirs.indexer_keys, atol=1e-5)
        assert torch.allclose(ours.keys, theirs.keys, atol=1e-5)


def test_crop_and_view_take_the_indexer_keys_and_positions_along():
    m = model()
    cache = fresh_cache(m.config)
    assert [type(layer) for layer in cache.layers] == [DynamicIndexedLayer] * 3
    for i in range(3):
        cache.update(torch.randn(1, 1, 7, 4), torch.randn(1, 1, 7, 2), i)
        cache.update_indexer(torch.randn(1, 7, 5), i)
    cache.layers[0].indexer_position_ids = torch.arange(7).expand(1, 1, 7)
    keys = [layer.indexer_keys for layer in cache.layers]
    with cache_view(cache, 4):
        assert all(layer.indexer_keys.shape[1] == 4 for layer in cache.layers)
        assert cache.layers[0].indexer_position_ids.shape[-1] == 4
    assert [layer.indexer_keys for layer in cache.layers] == keys  # the real layers are untouched
    crop_cache(cache, 5, range(1, 3))
    assert indexed_lengths(cache) == [(7, 7), (5, 5), (5, 5)]
    crop_cache(cache, 3)
    assert indexed_lengths(cache) == [(3, 3)] * 3
    assert cache.layers[0].indexer_position_ids.shape[-1] == 3
    assert torch.equal(cache.layers[1].indexer_keys, keys[1][:, :3])


#: A tiny GLM-5 (DSA) whose "shared" layers reuse the top-k selection the layer before them hands on (an extra block
#: output besides the hidden state): blocks 1 and 3 are fed by blocks 0 and 2.
GLM_FIELDS = {
    **{k: v for k, v in FIELDS.items() if k not in ("num_hidden_layers", "head_dim")},
    "num_hidden_layers": 4,
    "indexer_types": ["full", "shared", "full", "shared"],
}


@functools.cache
def fed_model(kind: str):
    torch.manual_seed(0)
    if kind == "glm_moe_dsa":
        return AutoModelForCausalLM.from_config(AutoConfig.for_model("glm_moe_dsa", **GLM_FIELDS)).eval()
    from deltaexit.shrink import tiny_model_for

    return tiny_model_for(kind).eval()  # hy_v4: shared DSA layers and a residual of several streams


def padded_generate(m, ee=None, new=NEW):
    ids = torch.tensor([[5, 60, 7, 80, 9], [0, 0, 11, 120, 13]])
    common = {"attention_mask": (ids != 0).long(), "max_new_tokens": new, "do_sample": False, "pad_token_id": 0}
    if ee is None:
        return m.generate(ids, **common)
    return ee.generate(ids, return_dict_in_generate=True, **common)


@pytest.mark.parametrize("kind", ["glm_moe_dsa", "hy_v4"])
def test_blocks_fed_by_the_block_before_reproduce_generate(kind):
    m = fed_model(kind)
    reference = padded_generate(m)
    for kv in ("verify", "recompute", "propagate"):
        ee = EarlyExit(m, "softmax-max", float("inf"), kv, backoff=False)
        assert torch.equal(padded_generate(m, ee).sequences, reference), kv
    assert ee.runner.carried  # the probe found the top-k selection handed from block to block
    assert all((c.key, c.output) == ("prev_topk_indices", 1) for c in ee.runner.carried.values())
    for min_exit in (1, 2):  # the verify pass starts at the first block of a fed chain
        policy = Verify(num_draft=2, ngram=0)
        ee = EarlyExit(m, "softmax-max", float("-inf"), policy, min_exit_layer=min_exit, backoff=False)
        out = padded_generate(m, ee)
        assert torch.equal(out.sequences, reference), ("verify always-exit", min_exit)
        assert out.stats.drafted > 0


def test_chain_start_walks_back_over_fed_blocks():
    m = fed_model("glm_moe_dsa")
    ee = EarlyExit(m, "softmax-max", float("inf"), "verify", backoff=False)
    padded_generate(m, ee, new=2)
    feeds = ee.runner.carried
    assert 1 in feeds and 3 in feeds and 0 not in feeds
    assert [ee.runner.chain_start(layer) for layer in range(5)] == [
        max(i for i in range(layer + 1) if i not in feeds) for layer in range(5)
    ]


def test_propagate_on_shared_layers_stops_after_their_keys_values():
    """A shared layer writes no indexer keys: its K/V-only call stops after ``cache.update`` (noted in the
    prompt's forward), before it would need the selection it is not handed."""
    m = fed_model("glm_moe_dsa")
    counter = CallCounter(layer.mlp for layer in m.model.layers)  # a K/V-only call stops before the MLP
    try:
        out = padded_generate(m, EarlyExit(m, ConstantScore(), 0.5, "propagate", min_exit_layer=1, backoff=False))
    finally:
        counter.close()
    layers = m.config.num_hidden_layers
    assert (out.exit_layers[:, 1:] == 1).all()
    assert out.stats.kv_only_calls == (layers - 1) * (NEW - 1)
    assert counter.calls == layers + (NEW - 1)
    n = cache_length(out.cache)
    assert all(layer.get_seq_length() == n for layer in out.cache.layers)
    shared = [i for i, t in enumerate(m.config.indexer_types) if t == "shared"]
    assert all(out.cache.layers[i].indexer_keys is None for i in shared)  # never written, as in model.generate
    assert all(out.cache.layers[i].indexer_keys.shape[1] == n for i in range(layers) if i not in shared)
