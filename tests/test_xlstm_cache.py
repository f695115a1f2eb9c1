"""A recurrent model's own cache class (xLSTM's ``xLSTMCache``: per-layer state tuples its loop overwrites in place
with what each block returns), viewed as recurrent cache layers under early exit."""

from __future__ import annotations

import pytest
import torch

from deltaexit import EarlyExit
from deltaexit.generation.kv import UnsupportedCacheError, cache_length
from deltaexit.generation.recompute import Recompute
from deltaexit.generation.recurrent import restore, take_snapshot
from deltaexit.generation.statecache import OwnStateCache, own_state_cache
from deltaexit.generation.verify import Verify
from deltaexit.shrink import tiny_model_for
from deltaexit.testing import ConstantScore, hook_counts, random_batch

NEW = 8
CELLS = [("verify", float("-inf")), ("propagate", float("inf")), ("recompute", float("inf"))]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def xlstm():
    return tiny_model_for("xlstm").eval()


def _kwargs(mask: torch.Tensor) -> dict:
    return {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}


def _states(cache) -> list[list[torch.Tensor]]:
    return [list(cache.rnn_state[i]) for i in sorted(cache.rnn_state)]


def test_own_cache_class_is_viewed_as_recurrent_layers_of_the_models_tensors(xlstm):
    n = xlstm.config.num_hidden_layers
    with torch.no_grad():
        own = xlstm(torch.tensor([[5, 6, 7, 8]]), use_cache=True).cache
    cache = own_state_cache(own, n)
    assert type(cache) is OwnStateCache and len(cache.layers) == n
    assert all(a is b for a, b in zip(cache.layers[1].recurrent_states.values(), own.rnn_state[1], strict=True))
    snap = take_snapshot(cache, 4)
    with torch.no_grad():  # the view is the model's cache for its forward too (rnn_state is read from its own)
        xlstm(torch.tensor([[9]]), cache=cache, use_cache=True)
    assert not torch.equal(own.rnn_state[1][0], snap.layers[1].recurrent[0])
    restore(cache, snap)  # in place: back into the model's own tensors
    assert torch.equal(own.rnn_state[1][0], snap.layers[1].recurrent[0])

    class NoState:
        def __init__(self):
            self.offset = torch.zeros(1)

    with pytest.raises(UnsupportedCacheError, match="NoState.*no single per-layer recurrent state"):
        own_state_cache(NoState(), n)


@pytest.mark.parametrize(("kv", "threshold"), CELLS)
def test_own_cache_class_reproduces_generate_with_hooks_gone(xlstm, kv, threshold):
    ids, mask = random_batch(xlstm.config.vocab_size, 2, 7)
    ref = xlstm.generate(ids, **_kwargs(mask))
    hooks = hook_counts(xlstm)
    ee = EarlyExit(xlstm, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert hook_counts(xlstm) == hooks
    assert torch.equal(out.sequences, ref)
    assert type(out.cache) is OwnStateCache
    assert [carry.arg for carry in ee.runner.returns_state] == [1]  # each block returns its layer's new state


def test_rejected_drafts_roll_the_own_states_back(xlstm):
    ids = torch.tensor([[5, 60, 7, 80], [9, 100, 11, 120]])
    mask = torch.ones_like(ids)
    ee = EarlyExit(xlstm, "softmax-max", float("-inf"), Verify(num_draft=3, ngram=0), backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert out.stats.accepted < out.stats.drafted  # some drafts were rejected: the states were rolled back
    assert torch.equal(out.sequences, xlstm.generate(ids, **_kwargs(mask)))


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_own_states_after_exits(xlstm, kv):
    """Tokens exit after block 1. ``recompute`` (at most 3 held back) then leaves the states the full model makes over
    the tokens the cache holds; ``propagate`` advances the skipped blocks' states from the exit state."""
    ids, mask = random_batch(xlstm.config.vocab_size, 1, 6)
    policy = Recompute(max_pending=3) if kv == "recompute" else kv
    ee = EarlyExit(xlstm, ConstantScore(), 0.5, policy, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, return_dict_in_generate=True, **_kwargs(mask))
    assert out.sequences.shape == (1, 6 + NEW) and bool((out.exit_layers[:, 1:] == 1).any())
    assert cache_length(out.cache) > 6 + (NEW - 1) // 2  # full-depth steps ran the held-back tokens too
    with torch.no_grad():
        prompt = xlstm(ids, use_cache=True).cache
        full = xlstm(out.sequences[:, : cache_length(out.cache)], use_cache=True).cache
    ours = _states(out.cache.own)
    deep = range(2, xlstm.config.num_hidden_layers)
    assert all(not torch.equal(ours[i][0], _states(prompt)[i][0]) for i in deep)  # the skipped blocks ran too
    if kv == "recompute":
        for a_layer, b_layer in zip(ours, _states(full), strict=True):
            for a, b in zip(a_layer, b_layer, strict=True):
                assert torch.allclose(a, b, atol=1e-4 * max(1.0, float(b.abs().max()))), kv
