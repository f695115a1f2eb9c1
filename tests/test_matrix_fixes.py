"""The support matrix's last non-refusal cells: Gemma 4's per-layer head size (on the tiny model the matrix
builds)."""

from __future__ import annotations

import pytest
import torch

from _tiny_lm import padded_batch
from deltaexit import EarlyExit
from deltaexit.measures.cost import block_flops_per_token
from deltaexit.shrink import tiny_model_for
from deltaexit.structure import config_int, find_structure

NEW = 6


def _same_as_generate(model, kv: str, threshold: float, seed: int = 0) -> bool:
    ids, mask = padded_batch(model.config.get_text_config().vocab_size, seed)
    kwargs = {"attention_mask": mask, "max_new_tokens": NEW, "do_sample": False, "pad_token_id": 0}
    ref = model.generate(ids, **kwargs)
    ee = EarlyExit(model, "softmax-max", threshold, kv, min_exit_layer=1, backoff=False)
    out = ee.generate(ids, **kwargs)
    return torch.equal(getattr(out, "sequences", out), ref)


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


# Moshi's cache-only window and Doge's key-selecting attention, refused here before, are reproduced now: see
# tests/test_odd_caches.py.
