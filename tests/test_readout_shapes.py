"""Readouts: blocks that hold the residual stream the head reads other than as ``output[0]``, ``[batch, seq, hidden]``.

XLNet's blocks are sequence-first, ProphetNet's carry a main stream and n-gram streams along the sequence axis (the
logits come from the first n-gram stream), Reformer's reversible blocks return two half-streams that the model
concatenates before its final norm. Structure discovery finds each readout from the model's own forward; collect
and the exact lens work on the state it gives, deltas telescope, and early-exit generation refuses these models
with a named error before any block runs.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import deltaexit as dx
from deltaexit.generation.kv import UnsupportedCacheError
from deltaexit.generation.runner import BlockRunner
from deltaexit.readout import Readout, readout_candidates
from deltaexit.shrink import tiny_model_for
from deltaexit.structure import block_output
from deltaexit.testing import cached_tiny_model, hook_counts, random_batch
from deltaexit.training.layerskip import BlockTaps

TYPES = ("xlnet", "prophetnet", "reformer")


@pytest.fixture(scope="module")
def models():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {t: tiny_model_for(t) for t in TYPES}


def _expected(structure):
    readout = structure.readout
    return {
        "xlnet": readout.seq_first and readout.segments == 1 and readout.outputs == (0,),
        "prophetnet": not readout.seq_first and (readout.segment, readout.segments) == (1, 3),
        "reformer": readout.outputs == (1, 0) and readout.inputs == ("prev_attn_output", "hidden_states"),
    }


@pytest.mark.parametrize("model_type", TYPES)
def test_readout_is_found_and_collect_gives_the_exact_lens(models, model_type):
    model = models[model_type]
    before = hook_counts(model)
    structure = dx.find_structure(model)
    assert structure.validated and not structure.readout.identity
    assert _expected(structure)[model_type], structure.readout
    ids, mask = random_batch(128, 2, 7, pad="left")
    raw: list[object] = []
    handle = structure.blocks[-1].register_forward_hook(lambda _m, _a, out: raw.append(out))
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta")) as trace:
        logits = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    assert hook_counts(model) == before
    h_out = trace.h_out
    assert h_out.shape[1:3] == (2, 7) and h_out.shape[-1] == structure.hidden_size
    lens = dx.Lens(structure)
    assert (lens(h_out[-1]) - logits).abs().max().item() <= 1e-4
    telescope = trace.h_in[0] + trace.delta.sum(0) - h_out[-1]
    assert telescope.abs().max().item() <= 1e-4 * max(1.0, h_out.abs().max().item())
    # what the readout undoes: the block's own first output tensor is not the state the head reads
    first = block_output(raw[-1])
    wrong = first.shape != h_out[-1].shape or (lens(first) - logits).abs().max().item() > 1e-3
    assert wrong


def test_reformer_state_joins_both_half_streams(models):
    model = models["reformer"]
    structure = dx.find_structure(model)
    assert structure.hidden_size == 2 * model.config.hidden_size
    with torch.no_grad(), dx.collect(model, ("h_in",), layers=[0]) as trace:
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    h0 = trace.h_in[0]
    half = model.config.hidden_size
    assert torch.equal(h0[..., :half], h0[..., half:])  # the embedding, duplicated for the reversible blocks


@pytest.mark.parametrize("model_type", ["prophetnet", "bart"])
def test_an_embedding_norm_is_not_taken_as_the_final_norm(model_type):
    """ProphetNet's ``embeddings_layer_norm`` and BART's ``layernorm_embedding`` are registered after the blocks but
    run before them; on post-LN blocks with default LayerNorm weights they even pass the lens check by chance. With
    trained (here: perturbed) weights the lens must stay exact."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model_for(model_type)  # its own: the test changes weights
    structure = dx.find_structure(model)
    embedding_norm = next(m for n, m in model.named_modules() if "embedding" in n and "norm" in n)
    assert structure.final_norm is not embedding_norm
    with torch.no_grad():
        embedding_norm.weight.mul_(torch.linspace(0.5, 2.0, embedding_norm.weight.numel()))
        ids = torch.tensor([[3, 4, 5, 6, 7]])
        with dx.collect(model, ("h_out",), structure=structure) as trace:
            logits = model(input_ids=ids).logits
        assert (dx.Lens(structure)(trace.h_out[-1]) - logits).abs().max().item() <= 1e-4


def test_candidates_list_the_identity_first_and_only_consistent_stream_sets():
    a, b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    found = readout_candidates((b, a), (a, b), ((), {"left": a, "right": b}), batch=1, tokens=4)
    assert found[0] == Readout()
    joined = [r for r in found if len(r.outputs) == 2]
    assert {(r.outputs, r.inputs) for r in joined} == {((0, 1), ("left", "right")), ((1, 0), ("right", "left"))}
    assert all(r.width == 16 for r in joined)
    # an output item that no argument of the next call takes is no stream
    assert all(len(r.outputs) == 1 for r in readout_candidates((b, a), (a, b), ((b,), {}), batch=1, tokens=4))
    seg = Readout(segments=3, segment=1)
    x = torch.arange(12.0).view(1, 12, 1)
    assert seg.view(x).flatten().tolist() == [4.0, 5.0, 6.0, 7.0]
    assert Readout(segments=5).view(x) is None


def test_plain_decoders_keep_the_identity_readout():
    for model_type in ("llama", "gpt2"):
        structure = dx.find_structure(cached_tiny_model(model_type))
        assert structure.readout.identity and structure.describe()["readout"] is None


@pytest.mark.parametrize("model_type", TYPES)
def test_early_exit_refuses_before_any_block_runs(models, model_type):
    model = models[model_type]
    blocks = dx.find_structure(model).blocks
    runs: list[int] = []
    handles = [b.register_forward_hook(lambda *_: runs.append(1)) for b in blocks]
    before = hook_counts(model)
    try:
        with pytest.raises((dx.StructureError, UnsupportedCacheError)):
            dx.EarlyExit(model, "softmax-max", float("inf"), "verify")
        with pytest.raises(dx.StructureError, match="hold the residual stream its head reads"):
            BlockRunner(model)
        assert hook_counts(model) == before and runs == []
        assert dx.find_structure(model).blocks is blocks
    finally:
        for handle in handles:
            handle.remove()


def test_layerskip_taps_read_the_state_and_refuse_layer_dropout(models):
    model = models["prophetnet"]
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad(), BlockTaps(model) as taps:
        logits = model(input_ids=ids).logits
    assert (dx.Lens.from_model(model)(taps.outputs[-1]) - logits).abs().max().item() <= 1e-4
    with pytest.raises(dx.StructureError, match="layer dropout"):
        BlockTaps(model, drop_probs=[0.1] * dx.find_structure(model).num_layers)
