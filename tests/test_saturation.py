"""Saturation labels checked against their definitions by brute force."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import deltaexit as dx
from deltaexit.testing import cached_tiny_model, random_batch


@st.composite
def topk_arrays(draw):
    layers = draw(st.integers(1, 6))
    tokens = draw(st.integers(1, 8))
    k = draw(st.integers(1, 3))
    vocab = draw(st.integers(k, k + 3))  # small vocab -> many coincidences
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(layers * tokens)])
    return ids.view(layers, tokens, k)


def _brute_saturation_layer(column: list[int]) -> int:
    """First 1-based layer from which every later top-1 equals the final one."""
    final = column[-1]
    layer = len(column)
    while layer > 1 and column[layer - 2] == final:
        layer -= 1
    return layer


@given(topk_arrays())
def test_labels_match_definitions(ids):
    sat = dx.saturation_from_topk(ids)
    layers, tokens, k = ids.shape
    for t in range(tokens):
        top1 = ids[:, t, 0].tolist()
        s = _brute_saturation_layer(top1)
        assert sat.saturation_layer[t] == s
        for layer in range(layers):
            assert bool(sat.saturated[layer, t]) == all(x == top1[-1] for x in top1[layer:])
        for layer in range(layers - 1):
            assert bool(sat.stable[layer, t]) == (top1[layer] == top1[layer + 1])
        if k > 1:
            for r in range(k):
                assert sat.topk_saturation_layer[r, t] == _brute_saturation_layer(ids[:, t, r].tolist())
    assert bool((sat.saturated[:-1] <= sat.saturated[1:]).all())
    assert bool(((sat.saturation_layer >= 1) & (sat.saturation_layer <= layers)).all())
    expected_saved = 1 - sat.saturation_layer.float().mean().item() / layers
    assert sat.oracle_compute_saved == pytest.approx(expected_saved)


def test_summary_excludes_padding():
    ids = torch.tensor([[[1], [1]], [[2], [1]], [[2], [1]]])  # 3 layers, 2 tokens
    full = dx.saturation_from_topk(ids)
    assert full.saturation_layer.tolist() == [2, 1]
    masked = dx.saturation_from_topk(ids, token_mask=torch.tensor([True, False]))
    assert masked.oracle_mean_layer == 2.0 and masked.num_tokens == 1
    assert full.oracle_mean_layer == 1.5


def test_saturation_from_trace_topk_matches_h_out_path():
    model = cached_tiny_model("llama")
    ids, mask = random_batch(128, 2, 6, pad="left")
    with dx.collect(model, ("h_out",), topk=3) as trace, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    lens = dx.Lens.from_model(model)
    from_topk = dx.saturation(trace)
    from_h = dx.saturation(trace, lens, k=3)
    assert torch.equal(from_topk.saturation_layer, from_h.saturation_layer)
    assert torch.equal(from_topk.topk_saturation_layer, from_h.topk_saturation_layer)
    summary = from_topk.summary()
    assert summary["num_tokens"] == int(mask.sum())
    assert len(summary["per_layer"]) == 3


def test_saturation_needs_all_layers():
    model = cached_tiny_model("llama")
    with dx.collect(model, ("h_out",), layers=[0, 1]) as trace, torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(dx.TraceError, match="every block"):
        dx.saturation(trace, dx.Lens.from_model(model))
    with dx.collect(model, ("delta",)) as trace, torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]))
    with pytest.raises(dx.TraceError, match="lens top-k"):
        dx.saturation(trace)
