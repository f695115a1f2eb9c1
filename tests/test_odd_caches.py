"""Caches early exit once refused: a window only the cache applies (moshi), attention that picks cached keys by a
score (doge), router states handed from block to block (zaya), a forward's own recurrent ``state`` (rwkv) and no
cache at all (openai-gpt). Each must reproduce ``model.generate`` token for token (tiny models the matrix builds)."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from deltaexit import EarlyExit
from deltaexit.generation.kv import UnsupportedCacheError, fresh_cache
from deltaexit.generation.recurrent import restore, take_snapshot
from deltaexit.generation.runner import BlockRunner
from deltaexit.generation.statecache import PrefixCache, StateCache, state_cache
from deltaexit.generation.windowed import CacheWindowLayer
from deltaexit.shrink import tiny_model_for
from deltaexit.structure import StructureError
from deltaexit.testing import ConstantScore, hook_counts, random_batch

NEW = 8
CELLS = [("verify", float("-inf")), ("propagate", float("inf")), ("recompute", float("inf"))]
pytestmark = pytest.mark.usefixtures("one_thread")


def _kwargs(mask: torch.Tensor) -> dict:
    return {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}


def _same_as_generate(model, kv, threshold: float, prompt: int = 10) -> bool:
    ids, mask = random_batch(model.config.get_text_config().vocab_size, 2, prompt, pad="left")
    ref = model.generate(ids, **_kwargs(mask))
    hooks = hook_counts(model)  # (transformers leaves its own output-capturing hooks after output_hidden_states)
    ee = EarlyExit(model, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, **_kwargs(mask))
    assert hook_counts(model) == hooks
    return torch.equal(getattr(out, "sequences", out), ref)


def test_cache_window_layer_returns_what_the_sliding_layer_returns_and_keeps_every_position():
    gen = torch.Generator().manual_seed(0)
    sliding, ours = DynamicSlidingWindowLayer(sliding_window=4), CacheWindowLayer(sliding_window=4)
    for n in (6, 1, 1, 2, 1, 1):  # a prompt longer than the window, one-token steps and a two-token pass
        k, v = torch.randn(1, 2, n, 3, generator=gen), torch.randn(1, 2, n, 3, generator=gen)
        assert sliding.get_mask_sizes(n) == ours.get_mask_sizes(n)
        for a, b in zip(sliding.update(k, v), ours.update(k, v), strict=True):
            assert torch.equal(a, b)
    assert ours.get_seq_length() == sliding.get_seq_length() == 12 and ours.keys.shape[-2] == 12
    ours.crop(-3)  # croppable: early exit rolls rejected drafts back
    assert ours.get_seq_length() == 9 and ours.get_mask_sizes(1) == (4, 6)


@pytest.fixture(scope="module")
def moshi():
    return tiny_model_for("moshi").eval()


@pytest.mark.parametrize(("kv", "threshold"), CELLS)
def test_cache_only_window_reproduces_generate(moshi, kv, threshold):
    assert moshi.config.sliding_window < 10 + NEW  # the window drops keys within the test's sequences
    assert _same_as_generate(moshi, kv, threshold)


def test_cache_only_window_matters_and_early_exit_keeps_it_in_the_cache(moshi):
    ids, mask = random_batch(moshi.config.vocab_size, 2, 10, pad="left")
    ref = moshi.generate(ids, **_kwargs(mask))
    unwindowed = moshi.generate(ids, cache=fresh_cache(moshi.config), **_kwargs(mask))  # full-length, no window
    assert not torch.equal(ref, unwindowed)  # why the window must be reproduced
    ee = EarlyExit(moshi, "softmax-max", float("-inf"), "verify", min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert torch.equal(out.sequences, ref)
    assert all(type(layer) is CacheWindowLayer for layer in out.cache.layers)
    assert {layer.get_seq_length() for layer in out.cache.layers} == {10 + NEW - 1}


@pytest.fixture(scope="module")
def doge():
    return tiny_model_for("doge").eval()


def test_key_selecting_attention_differs_between_one_pass_and_steps(doge):
    with torch.no_grad():  # why verify checks its drafts one token at a time on such attention
        ids, _ = random_batch(doge.config.vocab_size, 1, doge.config.keep_window_size + 4)
        prompt, chunk = ids[:, :-4], ids[:, -4:]
        cache_a = doge(prompt, use_cache=True).cache
        cache_b = doge(prompt, use_cache=True).cache
        together = doge(chunk, cache=cache_a, use_cache=True).logits
        steps = torch.cat([doge(chunk[:, i : i + 1], cache=cache_b).logits for i in range(4)], 1)
        assert not torch.allclose(together, steps, atol=1e-4)


@pytest.mark.parametrize(("kv", "threshold"), [*CELLS, ("tolerant", float("-inf"))])
def test_key_selecting_attention_reproduces_generate(doge, kv, threshold):
    assert doge.config.keep_window_size < 10 + NEW
    assert _same_as_generate(doge, kv, threshold)


@pytest.fixture(scope="module")
def zaya():
    return tiny_model_for("zaya").eval()


def test_blocks_taking_the_block_befores_extra_output_get_it_handed_on(zaya):
    runner = BlockRunner(zaya)
    ids = torch.tensor([[5, 6, 7, 8]])
    handle = runner.probe_output_type()
    with torch.no_grad():
        full = zaya(ids, output_hidden_states=True).hidden_states[-1]
    handle.remove()
    assert sorted(runner.carried) == list(range(1, runner.num_layers))  # router states, block to block
    with torch.no_grad():
        h, calls = runner.record(input_ids=ids, use_cache=False)
        for layer in range(runner.num_layers):
            h = runner.run_block(layer, h, calls[layer])
        assert torch.allclose(runner.structure.final_norm(h), full, atol=1e-5)
        carried, runner.carried = runner.carried, {}  # without handing them on: another residual stream
        h, calls = runner.record(input_ids=ids, use_cache=False)
        for layer in range(runner.num_layers):
            h = runner.run_block(layer, h, calls[layer])
        runner.carried = carried
        assert not torch.allclose(runner.structure.final_norm(h), full, atol=1e-4)


@pytest.mark.parametrize(("kv", "threshold"), CELLS)
def test_carried_block_outputs_reproduce_generate(zaya, kv, threshold):
    assert _same_as_generate(zaya, kv, threshold)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_carried_block_outputs_survive_exits(zaya, kv):
    ids, mask = random_batch(zaya.config.vocab_size, 2, 6, pad="left")
    ee = EarlyExit(zaya, ConstantScore(), 0.5, kv, min_exit_layer=1, backoff=False)  # every token exits
    hooks = hook_counts(zaya)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert out.sequences.shape == (2, 6 + NEW) and bool((out.exit_layers[:, 1:] == 1).any())
    assert hook_counts(zaya) == hooks


@pytest.fixture(scope="module")
def rwkv():
    return tiny_model_for("rwkv").eval()


def test_own_state_is_viewed_by_a_cache_and_handed_on_by_the_recorders(rwkv):
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        state = rwkv(ids, use_cache=True).state
    cache = state_cache(state, rwkv.config.num_hidden_layers)
    assert type(cache) is StateCache and len(cache.layers) == rwkv.config.num_hidden_layers
    snap = take_snapshot(cache, 4)
    with torch.no_grad():
        rwkv(torch.tensor([[9]]), state=state, use_cache=True)  # the blocks update the model's tensors in place
    assert not torch.equal(cache.layers[1].recurrent_states[2], snap.layers[1].recurrent[2])
    restore(cache, snap)  # in place: back into the model's own tensors
    assert torch.equal(state[2][..., 1], snap.layers[1].recurrent[2])
    with pytest.raises(UnsupportedCacheError, match="last dimension is the layer"):
        state_cache([torch.zeros(1, 4, 3)], rwkv.config.num_hidden_layers)
    ee = EarlyExit(rwkv, "softmax-max", float("-inf"), "verify", min_exit_layer=1, backoff=False)
    ee.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert [carry.key for carry in ee.runner.handed_on] == ["state"]  # each block hands the state list on


@pytest.mark.parametrize(("kv", "threshold"), CELLS)
def test_own_state_reproduces_generate(rwkv, kv, threshold):
    assert _same_as_generate(rwkv, kv, threshold)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_own_state_survives_exits(rwkv, kv):
    ids, mask = random_batch(rwkv.config.vocab_size, 1, 6)
    ee = EarlyExit(rwkv, ConstantScore(), 0.5, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert out.sequences.shape == (1, 6 + NEW) and bool((out.exit_layers[:, 1:] == 1).any())
    if kv == "propagate":
        assert out.stats.state_calls > 0  # a skipped block's state advanced from the exit state


@pytest.fixture(scope="module")
def gpt():
    return tiny_model_for("openai-gpt").eval()


@pytest.mark.parametrize(("kv", "threshold"), CELLS)
def test_no_cache_at_all_reproduces_generate(gpt, kv, threshold):
    assert _same_as_generate(gpt, kv, threshold)


@pytest.mark.parametrize("kv", ["verify", "propagate", "recompute"])
def test_no_cache_runs_the_whole_sequence_every_step(gpt, kv):
    ids, mask = random_batch(gpt.config.vocab_size, 1, 6)
    ee = EarlyExit(gpt, ConstantScore(), 0.5, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert type(out.cache) is PrefixCache and out.stats.kv_only_calls == 0
    assert out.stats.drafted > 0 if kv == "verify" else bool((out.exit_layers[:, 1:] == 1).any())
    # every pass runs the prefix again: more token-blocks than one new token per block run
    assert out.stats.token_blocks_run > out.stats.blocks_run
    if kv == "verify":  # lossless
        assert torch.equal(out.sequences, gpt.generate(ids, **_kwargs(mask)))


def test_a_hidden_state_changed_between_blocks_is_refused_after_the_prompt_with_hooks_gone():
    model = tiny_model_for("rwkv", rescale_every=2)  # halves the hidden state after every second block
    hooks = hook_counts(model)
    with pytest.raises(StructureError, match="changes the hidden state between blocks"):
        EarlyExit(model, "softmax-max", float("inf"), "verify").generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    assert hook_counts(model) == hooks
