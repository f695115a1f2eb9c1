"""Collector invariants: deltas telescope, the lens is exact, hooks vanish, outputs are untouched."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import deltaexit as dx
from deltaexit.testing import ARCHITECTURES, cached_tiny_model, hook_counts, random_batch, tiny_model

ATOL = 1e-4


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _check_invariants(model, ids, mask):
    before = hook_counts(model)
    bare = _forward(model, ids, mask)
    with dx.collect(model, ("h_in", "h_out", "delta"), topk=2) as trace:
        hooked = _forward(model, ids, mask)
    assert hook_counts(model) == before, "hooks left behind"
    assert torch.equal(bare, hooked), "collector changed the model's output"
    assert torch.equal(_forward(model, ids, mask), bare), "model changed after the collector"
    n = dx.find_structure(model).num_layers
    assert trace.delta.shape == (n, *ids.shape, trace.h_out.shape[-1])
    # Deltas telescope and the stream is continuous.
    torch.testing.assert_close(trace.h_in[0] + trace.delta.sum(0), trace.h_out[-1], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(trace.h_in[1:], trace.h_out[:-1], atol=0, rtol=0)
    torch.testing.assert_close(trace.h_out - trace.h_in, trace.delta, atol=1e-5, rtol=1e-5)
    # The lens on the last block reproduces the logits.
    lens = dx.Lens.from_model(model)
    torch.testing.assert_close(lens(trace.h_out[-1]), bare, atol=ATOL, rtol=1e-4)
    # Lens top-k captured in the hook agrees with the lens applied afterwards.
    ids_after = lens.topk(trace.h_out[-1], 2)[0]
    assert torch.equal(trace.topk_ids[-1][mask.bool()], ids_after[mask.bool()])
    assert torch.equal(trace.token_mask, mask.bool())
    return trace


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_invariants_on_every_architecture(model_type):
    model = cached_tiny_model(model_type)
    ids, mask = random_batch(model.config.vocab_size, 2, 6, pad="left")
    _check_invariants(model, ids, mask)


@settings(max_examples=60)
@given(
    model_type=st.sampled_from(ARCHITECTURES),
    num_layers=st.integers(1, 4),
    heads=st.sampled_from([2, 4]),
    head_dim=st.sampled_from([4, 8]),
    vocab=st.integers(16, 96),
    batch=st.integers(1, 3),
    seq=st.integers(1, 7),
    pad=st.sampled_from([None, "left", "right"]),
    seed=st.integers(0, 2**16),
)
def test_invariants_over_random_configs(model_type, num_layers, heads, head_dim, vocab, batch, seq, pad, seed):
    model = tiny_model(model_type, num_layers=num_layers, hidden=heads * head_dim, heads=heads, vocab=vocab, seed=seed)
    ids, mask = random_batch(vocab, batch, seq, seed=seed, pad=pad)
    ids = ids.clamp(max=vocab - 1)
    trace = _check_invariants(model, ids, mask)
    sat = dx.saturation(trace, dx.Lens.from_model(model))
    assert bool((sat.saturation_layer >= 1).all()) and bool((sat.saturation_layer <= num_layers).all())
    assert bool((sat.saturated[:-1] <= sat.saturated[1:]).all()), "saturated[l] must imply saturated[l+1]"


def test_hooks_removed_when_forward_raises(llama):
    before = hook_counts(llama)
    with pytest.raises(IndexError), dx.collect(llama, ("delta",)):
        llama(input_ids=torch.tensor([[10_000]]))  # id outside the vocabulary
    assert hook_counts(llama) == before


def test_two_collectors_do_not_disturb_each_other(llama):
    ids, mask = random_batch(128, 2, 5, pad="right")
    with dx.collect(llama, ("delta",)) as alone:
        _forward(llama, ids, mask)
    with (
        dx.collect(llama, ("delta",), layers=[0, 2]) as outer,
        dx.collect(llama, ("h_out", "delta")) as inner,
    ):
        _forward(llama, ids, mask)
    assert torch.equal(inner.delta, alone.delta)
    assert torch.equal(outer.delta, alone.delta[[0, 2]])
    assert outer.layers == (0, 2) and outer.layer_index(2) == 1


def test_layers_subset_and_negative_index(llama):
    ids, mask = random_batch(128, 1, 4)
    with dx.collect(llama, ("h_out",), layers=[-1]) as trace:
        _forward(llama, ids, mask)
    assert trace.layers == (2,) and trace.h_out.shape[0] == 1


def test_positions_last_and_mask_follow_padding(llama):
    ids, mask = random_batch(128, 3, 6, seed=3, pad="right")
    with dx.collect(llama, ("h_out",), positions="all") as full:
        _forward(llama, ids, mask)
    with dx.collect(llama, ("h_out",), positions="last") as last:
        _forward(llama, ids, mask)
    with dx.collect(llama, ("h_out",), positions="mask") as kept:
        _forward(llama, ids, mask)
    last_real = mask.sum(1) - 1
    expected_last = full.h_out[:, torch.arange(3), last_real].unsqueeze(2)
    assert torch.equal(last.h_out, expected_last)
    assert kept.h_out.shape[1] == int(mask.sum())
    assert torch.equal(kept.h_out, full.h_out[:, mask.bool()])
    assert torch.equal(full.tokens("h_out"), kept.h_out)
    assert kept.token_index.shape == (int(mask.sum()), 2)


def test_storage_dtype_and_device(llama):
    ids, mask = random_batch(128, 1, 4)
    with dx.collect(llama, ("delta", "h_out"), dtype=torch.float16, device="cpu") as trace:
        _forward(llama, ids, mask)
    assert trace.delta.dtype == torch.float16 and trace.h_out.device.type == "cpu"


@pytest.mark.parametrize("positions", ["auto", "last"])
def test_generate_gives_one_record_per_step(llama, positions):
    ids = torch.tensor([[5, 6, 7, 8]])
    with dx.collect(llama, ("delta",), positions=positions, topk=1) as trace:
        out = llama.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    steps = out.shape[1] - ids.shape[1]
    assert len(trace.records) == steps
    assert trace.delta.shape[:3] == (3, 1, steps)
    # The lens top-1 at the last layer of each step is the token generate picked.
    assert torch.equal(trace.topk_ids[-1, 0, :, 0], out[0, ids.shape[1] :])


def test_collect_defaults_to_one_record_per_generate_step(llama):
    ids = torch.tensor([[5, 6, 7, 8]])
    with dx.collect(llama, ("delta",)) as trace:
        out = llama.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5, pad_token_id=0)
    steps = out.shape[1] - ids.shape[1]
    assert trace.positions == "auto"
    assert len(trace.records) == steps
    assert trace.delta.shape[:3] == (3, 1, steps)


def test_collect_forwards_to_collector_without_restating_defaults(llama):
    import inspect

    defaults = {
        name: p.default
        for name, p in inspect.signature(dx.Collector).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    assert defaults["positions"] == "auto"
    collector = dx.collect(llama)
    for name in ("capture", "positions", "topk", "dtype"):
        assert getattr(collector, name) == (tuple(defaults[name]) if name == "capture" else defaults[name])


def test_auto_positions_keep_all_tokens_of_a_plain_forward(llama):
    ids, mask = random_batch(128, 2, 5)
    with dx.collect(llama, ("delta",)) as trace:
        _forward(llama, ids, mask)
    assert trace.delta.shape[:3] == (3, 2, 5)


class _ShapeChanger(nn.Module):
    """A toy 'causal LM' whose second block changes the hidden size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)])
        self.head = nn.Linear(4, 10)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, **_):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_delta_on_shape_changing_block_is_a_clear_error():
    model = _ShapeChanger()
    structure = dx.find_structure(model, blocks="layers", final_norm=None, validate=False)
    before = hook_counts(model)
    with pytest.raises(dx.StructureError, match="delta = h_out - h_in is undefined"):
        with dx.collect(model, ("delta",), structure=structure):
            model(input_ids=torch.tensor([[1, 2]]))
    assert hook_counts(model) == before
    with pytest.raises(dx.StructureError, match="capture layers of one width"):
        with dx.collect(model, ("h_out",), structure=structure):
            model(input_ids=torch.tensor([[1, 2]]))
    assert hook_counts(model) == before
    with dx.collect(model, ("h_in", "h_out"), layers=[1], structure=structure) as trace:
        model(input_ids=torch.tensor([[1, 2]]))
    assert trace.h_in.shape == (1, 1, 2, 8) and trace.h_out.shape == (1, 1, 2, 4)


def test_bad_input_errors(llama):
    with pytest.raises(IndexError, match="out of range"):
        dx.collect(llama, layers=[3])
    with pytest.raises(ValueError, match="unknown feature"):
        dx.collect(llama, ("logits",))
    with pytest.raises(ValueError, match="positions"):
        dx.collect(llama, positions="first")
    before = hook_counts(llama)
    with pytest.raises(ValueError, match="empty batch"), dx.collect(llama):
        llama(input_ids=torch.zeros(0, 4, dtype=torch.long))
    assert hook_counts(llama) == before
    collector = dx.collect(llama)
    with collector as trace:
        pass
    with pytest.raises(dx.TraceError, match="empty"):
        _ = trace.delta
    with pytest.raises(dx.TraceError, match="already used"):
        collector.__enter__()
    with pytest.raises(dx.TraceError, match="was not captured"):
        _ = trace.h_out
