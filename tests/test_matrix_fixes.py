"""The support matrix's last non-refusal cells: Gemma 4's per-layer head size, Moshi's cache-only window, Doge's
key-selecting attention (each on the tiny model the matrix builds)."""

from __future__ import annotations

import pytest
import torch

from deltaexit import EarlyExit
from deltaexit.generation import UnsupportedCacheError
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.shrink import tiny_model_for
from deltaexit.structure import config_int, find_structure

NEW = 6


def _batch(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


def _same_as_generate(model, kv: str, threshold: float, seed: int = 0) -> bool:
    ids, mask = _batch(model.config.get_text_config().vocab_size, seed)
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(ids, **kwargs)
    ee = EarlyExit(model, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, **kwargs)
    return torch.equal(getattr(out, "sequences", out), ref)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def gemma4():
    return tiny_model_for("gemma4_text").eval()


def test_per_layer_head_dim_read_from_the_layer_configs(gemma4):
    config = gemma4.config
    assert config.is_heterogeneous  # the global head_dim is refused by transformers
    per_layer = [c.head_dim for c in config.per_layer_config]
    assert len(set(per_layer)) > 1
    assert [config_int(config, ("head_dim",), layer=i) for i in range(len(per_layer))] == per_layer
    assert config_int(config, ("head_dim",)) == max(per_layer)
    structure = find_structure(gemma4, validate=False)
    assert structure.head_dim == max(per_layer)
    # the attention term of the cost follows each layer's own head size (q_proj's output rows)
    for i, block in enumerate(structure.blocks):
        attn = 4.0 * 100 * structure.attention_heads(i) * structure.attention_head_dim(i)
        q_rows = block.self_attn.q_proj.weight.shape[0]
        assert structure.attention_heads(i) * structure.attention_head_dim(i) == q_rows
        base = block_flops_per_token(gemma4, context=0, layer=i)
        assert block_flops_per_token(gemma4, context=100, layer=i) == pytest.approx(base + attn)


@pytest.mark.parametrize(
    ("kv", "threshold"), [("verify", float("inf")), ("verify", float("-inf")), ("propagate", float("inf"))]
)
def test_gemma4_generation_reproduces_generate(gemma4, kv, threshold):
    assert _same_as_generate(gemma4, kv, threshold)


def test_cache_only_window_refused_before_any_block_runs():
    model = tiny_model_for("moshi").eval()
    assert model.config.sliding_window is not None
    for kv in ("verify", "propagate", "recompute"):
        with pytest.raises(UnsupportedCacheError, match="sliding_window"):
            EarlyExit(model, "softmax-max", float("inf"), kv)
        assert _hooks(model) == 0
    # the refusal's way out: a window no sequence exceeds drops no key, and then early exit reproduces generate
    model.config.sliding_window = model.config.max_position_embeddings
    assert _same_as_generate(model, "verify", float("-inf"))


def test_key_selecting_attention_refuses_drafting_only():
    model = tiny_model_for("doge").eval()
    with torch.no_grad():  # why: transformers' own multi-token pass differs from its one-token steps past the window
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, model.config.vocab_size, (1, model.config.keep_window_size + 4), generator=gen)
        prompt, chunk = ids[:, :-4], ids[:, -4:]
        cache_a = model(prompt, use_cache=True).cache
        cache_b = model(prompt, use_cache=True).cache
        together = model(chunk, cache=cache_a, use_cache=True).logits
        steps = torch.cat([model(chunk[:, i : i + 1], cache=cache_b).logits for i in range(4)], 1)
        assert not torch.allclose(together, steps, atol=1e-4)
    for kv in ("verify", "tolerant"):
        with pytest.raises(UnsupportedCacheError, match="topk"):
            EarlyExit(model, "softmax-max", float("-inf"), kv)
        assert _hooks(model) == 0
    assert _same_as_generate(model, "propagate", float("inf"))
