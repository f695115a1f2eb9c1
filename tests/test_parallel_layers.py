"""Layers kept as parts in parallel per-layer lists (issue 14): one virtual block per layer.

XLM's ``transformer`` holds ``attentions``, ``layer_norm1``, ``ffns`` and ``layer_norm2`` as four parallel lists that
its forward wires layer by layer (and multiplies the stream by the padding mask in place between layers). Structure
discovery builds one :class:`deltaexit.parallel.ParallelBlock` per layer: collect and the exact lens work through
hooks on each layer's first and last part; early exit and layer dropout refuse it by name before any block runs.
A toy model with the same shape shows the mechanism is not XLM's; lists that are not called layer by layer, or whose
last part does not hand the stream on, stay refused.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import deltaexit as dx
from deltaexit.generation import EarlyExit
from deltaexit.parallel import ParallelBlocks
from deltaexit.testing import hook_counts, random_batch
from deltaexit.training.layerskip import BlockTaps, early_exit_loss

PARTS = ("attentions", "layer_norm1", "ffns", "layer_norm2")


@functools.cache
def xlm(causal: bool = True):
    config = AutoConfig.for_model("xlm", emb_dim=32, n_layers=3, n_heads=4, vocab_size=128, causal=causal)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("causal", [True, False])  # XLM's default config is not causal
def test_xlm_layers_become_virtual_blocks_and_collect_matches_the_models_hidden_states(causal):
    model = xlm(causal)
    structure = dx.find_structure(model)
    assert isinstance(structure.blocks, ParallelBlocks) and structure.num_layers == 3
    assert structure.block_path == "transformer.{" + ",".join(PARTS) + "}"
    assert structure.blocks[1].entry is model.transformer.attentions[1]
    assert structure.blocks[1].exit is model.transformer.layer_norm2[1]
    ids, mask = random_batch(128, 2, 7, pad="left")  # the forward zeroes padded positions in place between layers
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta"), positions="all") as trace:
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    states = torch.stack(out.hidden_states)  # the stream before each layer, and after the last
    assert torch.equal(trace.h_in, states[:-1]) and torch.equal(trace.h_out, states[1:])
    assert torch.allclose(trace.h_in[0] + trace.delta.sum(0), trace.h_out[-1], atol=1e-5)
    lens_logits = dx.Lens(structure)(trace.h_out[-1])
    assert (lens_logits - out.logits).abs().max() <= 1e-4
    assert hook_counts(model) == 0


def test_xlm_early_exit_is_refused_by_name_before_any_part_runs():
    model = xlm()
    dx.find_structure(model)  # the structure check's own forward runs first
    ran: list[int] = []
    handles = [m.register_forward_hook(lambda *_: ran.append(1)) for m in model.transformer.modules()]
    try:
        for kv in ("verify", "propagate", "recompute"):
            with pytest.raises(dx.StructureError, match="not block modules") as exc:
                EarlyExit(model, "softmax-max", float("inf"), kv)
            assert "parallel lists" in str(exc.value) and "model.generate" in str(exc.value)
    finally:
        for handle in handles:
            handle.remove()
    assert not ran and hook_counts(model) == 0


def test_xlm_exit_losses_work_and_layer_dropout_is_refused():
    model = xlm()
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():
        loss, per_layer = early_exit_loss(model, ids, [0.2, 0.3, 0.5])
        logits = model(input_ids=ids).logits
    reference = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert torch.isfinite(loss) and abs(per_layer[-1] - float(reference)) < 1e-4
    with pytest.raises(dx.StructureError, match="layer dropout"):
        BlockTaps(model, drop_probs=[0.0, 0.5, 0.0])
    assert hook_counts(model) == 0


def test_a_forward_hook_on_a_virtual_block_cannot_replace_its_output():
    model = xlm()
    block = dx.find_structure(model).blocks[0]
    handle = block.register_forward_hook(lambda _m, _a, out: out * 2)
    try:
        with pytest.raises(RuntimeError, match="cannot be replaced"):
            model(input_ids=torch.tensor([[5, 6, 7]]))
    finally:
        handle.remove()
    assert hook_counts(model) == 0
    with pytest.raises(RuntimeError, match="virtual block"):
        block(torch.zeros(1, 3, 32))


# -- the same shape on a model deltaexit was never told about -------------------------------------------------------


class _Stack(nn.Module):
    """Per-layer parts in parallel lists; ``wiring`` says how the forward puts them together."""

    def __init__(self, hidden: int, layers: int, wiring: str) -> None:
        super().__init__()
        self.mix = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.LayerNorm(hidden) for _ in range(layers)])
        self.wiring = wiring

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.wiring == "post-norm":  # h = norm(h + mix(h)): the last part hands the stream on
            for mix, norm in zip(self.mix, self.norms):
                h = norm(h + torch.tanh(mix(h)))
        elif self.wiring == "pre-norm":  # h = h + mix(norm(h)): the stream leaves outside the parts
            for mix, norm in zip(self.mix, self.norms):
                h = h + torch.tanh(mix(norm(h)))
        else:  # every mix first, then every norm: not layer by layer
            for mix in self.mix:
                h = h + torch.tanh(mix(h))
            for norm in self.norms:
                h = norm(h)
        return h


class ToyParallelLM(nn.Module):
    def __init__(self, wiring: str, hidden: int = 16, layers: int = 3, vocab: int = 50) -> None:
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=layers, vocab_size=vocab, hidden_size=hidden)
        self.embed = nn.Embedding(vocab, hidden)
        self.stack = _Stack(hidden, layers, wiring)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.stack(self.embed(input_ids))))


def _toy(wiring: str) -> ToyParallelLM:
    torch.manual_seed(1)
    return ToyParallelLM(wiring).eval()


def test_a_toy_model_with_parallel_layer_lists_gets_virtual_blocks():
    model = _toy("post-norm")
    structure = dx.find_structure(model)
    assert isinstance(structure.blocks, ParallelBlocks) and structure.block_path == "stack.{mix,norms}"
    ids = torch.tensor([[3, 7, 11, 19, 23]])
    with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta")) as trace:
        logits = model(ids).logits
        h = model.embed(ids)
        expected = []
        for mix, norm in zip(model.stack.mix, model.stack.norms):
            h = norm(h + torch.tanh(mix(h)))
            expected.append(h)
    assert torch.allclose(trace.h_out, torch.stack(expected), atol=1e-6)
    assert torch.allclose(trace.h_in[0] + trace.delta.sum(0), trace.h_out[-1], atol=1e-5)
    assert (dx.Lens(structure)(trace.h_out[-1]) - logits).abs().max() <= 1e-4
    assert hook_counts(model) == 0


def test_parallel_lists_whose_last_part_does_not_hand_the_stream_on_are_refused_by_name():
    model = _toy("pre-norm")
    with pytest.raises(dx.StructureError, match="not block modules") as exc:
        dx.collect(model)
    message = str(exc.value)
    assert "'stack.mix'" in message and "'stack.norms'" in message and "does not take the tensor" in message
    assert hook_counts(model) == 0


def test_parallel_lists_not_called_layer_by_layer_stay_several_candidates():
    model = _toy("list by list")
    with pytest.raises(dx.StructureError, match="several candidate block lists") as exc:
        dx.find_structure(model)
    assert "blocks=" in str(exc.value)
    assert hook_counts(model) == 0
