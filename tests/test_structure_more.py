"""Structure discovery on more shapes (issue 14): skipped blocks, stacked residual streams.

Mllama's cross-attention blocks do not run on a text-only forward (the model skips them without
``cross_attention_states``): they are identity steps of the residual stream, recorded as ``delta == 0`` by
collect, kept out of the exit layers and skipped by early-exit generation exactly as the model skips them.
Gemma-3n's blocks pass four residual streams stacked on a leading axis, merged before the final norm by code in
the model's forward: the merge is read off a traced forward, and the lens reproduces the logits.
"""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

import deltaexit as dx
from deltaexit.generation import EarlyExit, Verify
from deltaexit.generation.skipped import SkippedLayer, fill_skipped_layers
from deltaexit.shrink import tiny_model_for
from deltaexit.streams import StreamMerge
from deltaexit.testing import ConstantScore, hook_counts

TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@functools.cache
def mllama(layers: int = 4, cross: tuple[int, ...] = (1,)):
    config = AutoConfig.for_model(
        "mllama", text_config={**TEXT, "num_hidden_layers": layers, "cross_attention_layers": list(cross)}
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


IDS = torch.tensor([[5, 9, 17, 33, 65, 3], [0, 0, 7, 8, 9, 10]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


@pytest.mark.parametrize("cross", [(1, 3), (0,)])
def test_skipped_blocks_are_identity_steps_of_collect_and_the_lens(cross):
    model = mllama(4, cross)
    before = hook_counts(model)
    structure = dx.find_structure(model)
    assert structure.skipped == cross and structure.num_layers == 4
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta")) as trace:
        logits = model(input_ids=IDS, attention_mask=MASK).logits
    assert hook_counts(model) == before
    for layer in cross:
        assert torch.equal(trace.delta[layer], torch.zeros_like(trace.delta[layer]))
        assert torch.equal(trace.h_in[layer], trace.h_out[layer])
    assert all(trace.delta[i].abs().max() > 0 for i in range(4) if i not in cross)  # the others really ran
    torch.testing.assert_close(trace.h_in[0] + trace.delta.sum(0), trace.h_out[-1], atol=1e-5, rtol=0)
    lens = dx.Lens(structure)
    with torch.no_grad():
        err = (lens(trace.h_out[-1]) - logits).abs()[MASK.bool()].max()
    assert err <= 1e-4
    # A skipped block captured alone carries the state the model passes over it.
    with torch.no_grad(), dx.collect(model, ("h_out",), layers=[cross[-1]]) as alone:
        model(input_ids=IDS, attention_mask=MASK)
    assert torch.equal(alone.h_out[0], trace.h_out[cross[-1]])


def _generate(model, ee=None, **extra):
    common = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "attention_mask": MASK}
    if ee is None:
        return model.generate(IDS, **common)
    return ee.generate(IDS, return_dict_in_generate=True, **common, **extra)


def test_early_exit_skips_the_blocks_the_model_skips():
    cross = (1, 3)  # one in the middle, one last (a lazily built cache has no layer for it)
    model = mllama(4, cross)
    reference = _generate(model)
    for kv in ("verify", "propagate", "recompute"):
        out = _generate(model, EarlyExit(model, "softmax-max", float("inf"), kv, backoff=False))
        assert torch.equal(out.sequences, reference), kv
    lossless = EarlyExit(model, "softmax-max", float("-inf"), Verify(num_draft=2), min_exit_layer=1, backoff=False)
    out = _generate(model, lossless)
    assert torch.equal(out.sequences, reference)
    assert out.stats.drafted > 0
    assert all(isinstance(out.cache.layers[i], SkippedLayer) for i in cross)


def test_no_exit_is_taken_after_a_skipped_block():
    model = mllama(4, (1, 3))
    # Every scored block would pass: the first scored one is after block 1, which the model skips.
    ee = EarlyExit(model, ConstantScore(1.0), 0.5, "recompute", min_exit_layer=2, backoff=False)
    out = _generate(model, ee)
    exits = out.exit_layers[:, 1:]
    assert exits.numel() > 0 and bool((exits == 3).all()), out.exit_layers


def test_image_inputs_are_refused_before_any_block_runs():
    model = mllama(4, (1, 3))
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda *_: ran.append(1)) for b in model.model.layers]
    try:
        ee = EarlyExit(model, "softmax-max", float("inf"), "verify", backoff=False)
        before = hook_counts(model)
        with pytest.raises(ValueError, match="cross_attention_states") as exc:
            _generate(model, ee, cross_attention_states=torch.zeros(2, 1, 32))
        assert "skips blocks [1, 3]" in str(exc.value) and "model.generate" in str(exc.value)
        assert not ran and hook_counts(model) == before
    finally:
        for handle in handles:
            handle.remove()


def test_filled_skipped_cache_layer_is_refused():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), 0)
    with pytest.raises(ValueError, match=r"blocks \[0\] hold states"):
        fill_skipped_layers(cache, [0], 2)
    empty = DynamicCache()
    fill_skipped_layers(empty, [0, 1], 2)
    assert [type(layer) for layer in empty.layers] == [SkippedLayer, SkippedLayer]


# -- residual streams stacked on a leading axis (Gemma-3n's AltUp) ---------------------------------------------


@functools.cache
def gemma3n():
    config = AutoConfig.for_model(
        "gemma3n_text",
        **{**TEXT, "head_dim": 8, "num_hidden_layers": 4, "sliding_window": 8, "laurel_rank": 8},
        layer_types=["sliding_attention", "full_attention"] * 2,
        vocab_size_per_layer_input=128,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0] * 4,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_leading_streams_are_merged_as_the_model_merges_them():
    model = gemma3n()
    before = hook_counts(model)
    structure = dx.find_structure(model)
    streams = model.config.altup_num_inputs
    assert structure.leading_streams and structure.state_dims == 2
    (merge,) = structure.pre_norm
    assert isinstance(merge, StreamMerge) and merge.rescale and merge.reduce == "mean"
    assert merge.stream_modules[0] is None
    assert list(merge.stream_modules[1:]) == list(model.model.altup_unembed_projections)
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta"), topk=3) as trace:
        logits = model(input_ids=IDS, attention_mask=MASK).logits
    assert hook_counts(model) == before
    hidden = model.config.hidden_size
    assert tuple(trace.h_out.shape) == (structure.num_layers, 2, IDS.shape[1], streams, hidden)
    torch.testing.assert_close(trace.h_in[0] + trace.delta.sum(0), trace.h_out[-1], atol=1e-4, rtol=0)
    lens = dx.Lens(structure)
    with torch.no_grad():
        assert (lens(trace.h_out[-1]) - logits).abs()[MASK.bool()].max() <= 1e-4
        # The merge the trace picked is the one that fits: a plain mean of the mapped streams does not.
        plain = StreamMerge(merge.stream_modules, rescale=False, reduce="mean")
        structure.pre_norm = (plain,)
        assert (lens(trace.h_out[-1]) - logits).abs().max() > 1e-3
        structure.pre_norm = (merge,)
    assert torch.equal(trace.topk_ids[-1], logits.topk(3, dim=-1).indices)


def test_leading_streams_generate_early_exit_as_the_model_does():
    """Early exit runs on stacked streams (it was refused before the runner converted layouts at block calls):
    never-exit reproduces model.generate and the hooks are gone after."""
    model = gemma3n()
    ids = torch.tensor([[3, 5, 7, 9]])
    ee = EarlyExit(model, "softmax-max", float("inf"), "verify")
    out = ee.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0))
    assert hook_counts(model) == 0


# -- shapes that stay refused, by name ----------------------------------------------------------------------------


# XLM's parallel per-layer lists are virtual blocks now (tests/test_parallel_layers.py, with the shapes still refused).


def test_readout_over_a_stack_of_earlier_states_is_refused_by_name():
    model = tiny_model_for("inkling2_text", num_hidden_layers=2).train()
    with pytest.raises(dx.StructureError, match="stack of states") as exc:
        dx.find_structure(model)
    assert "'model.final_input'" in str(exc.value) and "Inkling2BlockAttentionResidual" in str(exc.value)
    assert hook_counts(model) == 0 and model.training
