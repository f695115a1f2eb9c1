"""The shrinker's general rules for hybrid, encoder-decoder and derived-width configs, and the cache bookkeeping
for models whose cache holds a constant offset more positions than the prompt (CPM-Ant's prompt tokens) or
several cache layers per block (LongCat-Flash's two attention sublayers)."""

from __future__ import annotations

import pytest
import torch

from _tiny_lm import padded_batch
from deltaexit import EarlyExit
from deltaexit.shrink import shrink_config, tiny_model_for

NEW = 6


def _same_as_generate(model, kv: str, threshold: float, *, pad: bool = True) -> bool:
    ids, mask = padded_batch(model.config.get_text_config().vocab_size)
    if not pad:
        ids, mask = ids[:1], torch.ones_like(ids[:1])
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(ids, **kwargs)
    ee = EarlyExit(model, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, **kwargs)
    return torch.equal(getattr(out, "sequences", out), ref)


def test_all_recurrent_hybrid_default_gets_one_attention_layer():
    # both defaults name Mamba layers only (transformers' generate then fails: no attention layer to read a length
    # from); the tiny config makes its last layer an attention layer, through the field the config reads
    granite = shrink_config("granitemoehybrid")
    assert granite.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    bamba = shrink_config("bamba")
    assert bamba.attn_layer_indices == [3]
    assert bamba.layers_block_type[-1] == "full_attention"
    # a pure SSM config (no attention heads) stays as it is
    assert set(shrink_config("mamba2").layer_types) == {"linear_attention"}
    model = tiny_model_for("granitemoehybrid")
    assert _same_as_generate(model, "propagate", float("inf"), pad=False)


def test_encoder_decoder_layer_count_that_sizes_the_cache():
    # Blenderbot's num_hidden_layers reads encoder_layers (2 at default, 24 decoder layers): the cache of its causal
    # LM was sized 2 for 4 blocks. That field gets the tiny count too.
    config = shrink_config("blenderbot")
    assert config.encoder_layers == config.decoder_layers == 4
    model = tiny_model_for("blenderbot")
    assert _same_as_generate(model, "propagate", float("inf"))


def test_derived_width_factor_re_solved_and_block_count_shrunk():
    config = shrink_config("xlstm")
    assert config.num_blocks == config.num_hidden_layers == 4
    # qk_dim rounds hidden * qk_dim_factor up to 64; the layers use it unrounded: the factor keeps them equal
    assert config.qk_dim == int(config.hidden_size * config.qk_dim_factor)
    assert config.v_dim == int(config.hidden_size * config.v_dim_factor)
    model = tiny_model_for("xlstm")
    ids = torch.randint(0, 256, (1, 8))
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_default_choice_filled_from_its_list():
    config = shrink_config("xmod")
    assert config.default_language == config.languages[0]
    model = tiny_model_for("xmod")
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 5))).logits.shape == (1, 5, 256)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "qwen3_next"])
def test_rules_leave_other_configs_alone(model_type):
    from transformers import AutoConfig

    config, default = shrink_config(model_type), AutoConfig.for_model(model_type)
    assert getattr(config, "layer_types", None) is None or set(config.layer_types) == set(default.layer_types)


def test_constant_cache_offset_bookkeeping():
    from deltaexit.generation.kv import (
        UnsupportedCacheError,
        cache_length,
        cache_lengths,
        cache_offset,
        cache_view,
        check_cache,
        crop_cache,
        fresh_cache,
        set_cache_length,
    )

    cache = fresh_cache()
    for layer in range(3):
        cache.update(torch.zeros(1, 2, 12, 4), torch.zeros(1, 2, 12, 4), layer)
    check_cache(cache, 3, 8)  # 4 positions before the 8 tokens in every layer
    assert cache_offset(cache) == 4 and cache_length(cache) == 8
    crop_cache(cache, 6)
    assert cache_lengths(cache) == [10, 10, 10] and cache_length(cache) == 6
    with cache_view(cache, 5):
        assert cache_lengths(cache) == [9, 9, 9]
    set_cache_length(cache, 6)
    with pytest.raises(UnsupportedCacheError, match="did not stay constant"):
        set_cache_length(cache, 7)  # a cache that did not grow with the tokens
    cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)
    with pytest.raises(UnsupportedCacheError, match="in every layer"):
        check_cache(cache, 3, 6)  # different lengths in different layers: no constant offset


@pytest.fixture(scope="module")
def cpmant():
    return tiny_model_for("cpmant")


@pytest.mark.parametrize(("kv", "threshold"), [("verify", float("-inf")), ("recompute", float("inf"))])
def test_prepended_positions_reproduce_generate(cpmant, kv, threshold):
    assert cpmant.config.prompt_length > 0  # CPM-Ant prepends prompt_length positions to every sequence
    assert _same_as_generate(cpmant, kv, threshold)


@pytest.mark.parametrize("kv", ["propagate", "recompute"])
def test_prepended_positions_always_exit_keeps_the_offset(cpmant, kv):
    # every token exits at block 1: propagate's K/V-only calls and recompute's crops keep offset + tokens in every
    # layer (set_cache_length checks it after each step)
    ids, mask = padded_batch(256)
    ee = EarlyExit(cpmant, "softmax-max", float("-inf"), kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert getattr(out, "sequences", out).shape == (2, 8 + NEW)


def test_head_sizes_scaled_by_one_factor_when_fixed_sizes_are_refused():
    # Dots3's validator wants head_dim == qk_nope + qk_rope in its SWA layers (192 + 64 = 256 at default), and its
    # rotary part (head_dim x partial_rotary_factor) equal to qk_rope: fixed head sizes break both
    config = shrink_config("dots3_note_text").to_dict()
    swa = config["per_layer_config"][str(config["layer_types"].index("sliding_attention"))]
    assert config["head_dim"] == swa["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    partial = config["rope_parameters"]["sliding_attention"]["partial_rotary_factor"]
    assert config["head_dim"] * partial == config["qk_rope_head_dim"]
    model = tiny_model_for("dots3_note_text")
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)
    assert shrink_config("llama").head_dim == 16  # configs that take the fixed sizes keep them


@pytest.fixture(scope="module")
def longcat():
    return tiny_model_for("longcat_flash")


def test_blocks_owning_several_cache_layers(longcat):
    from deltaexit.generation.kv import block_layers, check_cache, crop_cache, fresh_cache

    blocks = longcat.model.layers
    cache = fresh_cache()
    for layer in range(2 * len(blocks)):
        cache.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), layer)
    check_cache(cache, len(blocks), 8, blocks)  # two attention sublayers per block: layer_idx 2i and 2i + 1
    assert [block_layers(cache, b) for b in range(len(blocks))] == [[2 * b, 2 * b + 1] for b in range(len(blocks))]
    crop_cache(cache, 5, range(2, len(blocks)))  # the deep blocks' layers only
    assert [layer.get_seq_length() for layer in cache.layers] == [8] * 4 + [5] * (2 * len(blocks) - 4)
    bare = fresh_cache()
    for layer in range(2 * len(blocks) + 1):  # a layer no block names: refused
        bare.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), layer)
    with pytest.raises(Exception, match="layer_idx"):
        check_cache(bare, len(blocks), 8, blocks)


@pytest.mark.parametrize(("kv", "threshold"), [("verify", float("-inf")), ("propagate", float("inf"))])
def test_several_cache_layers_per_block_reproduce_generate(longcat, kv, threshold):
    assert _same_as_generate(longcat, kv, threshold, pad=False)


def test_several_cache_layers_per_block_propagate_stops_after_the_last_write(longcat):
    ids, mask = padded_batch(256)
    ids, mask = ids[:1], mask[:1]
    ee = EarlyExit(longcat, "softmax-max", float("-inf"), "propagate", min_exit_layer=1, backoff=False)
    out = ee.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True
    )
    assert out.stats.kv_only_calls == (NEW - 1) * (len(ee.structure.blocks) - 1)
    # every sublayer's cache grew with every token: the K/V-only calls ran up to each block's second sublayer
    assert {layer.get_seq_length() for layer in out.cache.layers} == {8 + NEW - 1}


def test_shared_expert_count_left_none_gets_the_tiny_value():
    from transformers import AutoConfig

    assert AutoConfig.for_model("dots1").n_shared_experts is None  # the default cannot build its shared experts
    assert shrink_config("dots1").n_shared_experts == 1
    model = tiny_model_for("dots1")
    with torch.no_grad():
        assert model(torch.randint(0, 256, (1, 8))).logits.shape == (1, 8, 256)
