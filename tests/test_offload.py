"""Models split across devices with accelerate (CPU and disk offload): collectors, lens, streaming."""

from __future__ import annotations

import pytest
import torch

import deltaexit as dx
from deltaexit.generation.verify import Verify
from deltaexit.streaming import collect_to_disk, load_features
from deltaexit.testing import tiny_model

accelerate = pytest.importorskip("accelerate")
from transformers import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# Embeddings, some blocks, the final norm and the head on "disk"; the rest on the CPU.
DEVICE_MAPS = {
    "gpt2": {"transformer.wte": "disk", "transformer.wpe": "disk", "transformer.drop": "cpu",
             "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.h.2": "disk",
             "transformer.h.3": "cpu", "transformer.ln_f": "disk", "lm_head": "disk"},
    "llama": {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "disk",
              "model.rotary_emb": "cpu", "lm_head": "disk"},
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(DEVICE_MAPS))
def pair(request, tmp_path_factory):
    """(plain model, the same weights loaded with a device_map that offloads to disk)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    plain = tiny_model(model_type, num_layers=4, hidden=32, vocab=128, seed=3)
    plain.save_pretrained(root / "model")
    offloaded = AutoModelForCausalLM.from_pretrained(
        root / "model", device_map=DEVICE_MAPS[model_type], offload_folder=str(root / "offload")
    ).eval()
    assert any(p.device.type == "meta" for p in offloaded.parameters())  # really offloaded
    return plain, offloaded


IDS = torch.tensor([[5, 9, 17, 3, 44, 101, 7, 8], [12, 13, 14, 15, 16, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


def test_structure_and_lens_are_exact_on_an_offloaded_model(pair):
    plain, offloaded = pair
    structure = dx.find_structure(offloaded)  # validates with a dummy forward
    assert structure.validated and structure.num_layers == 4
    with torch.no_grad(), dx.collect(offloaded, ("h_out",)) as trace:
        logits = offloaded(input_ids=IDS, attention_mask=MASK).logits
    lens = dx.Lens.from_model(offloaded)
    with torch.no_grad():
        torch.testing.assert_close(lens(trace.h_out[-1]), logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, plain(input_ids=IDS, attention_mask=MASK).logits, atol=1e-5, rtol=1e-4)


def test_collector_on_an_offloaded_model_matches_the_plain_model(pair):
    plain, offloaded = pair
    traces = []
    for model in (plain, offloaded):
        with torch.no_grad(), dx.collect(model, ("h_in", "h_out", "delta"), topk=3, device="cpu") as trace:
            model(input_ids=IDS, attention_mask=MASK)
        traces.append(trace)
    a, b = traces
    for name in ("h_in", "h_out", "delta", "topk_probs"):
        torch.testing.assert_close(a.get(name), b.get(name), atol=1e-5, rtol=1e-4)
        assert b.get(name).device == torch.device("cpu")
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in dx.find_structure(offloaded).blocks)


def test_streaming_collection_of_an_offloaded_model_matches_the_plain_model(pair, tmp_path):
    plain, offloaded = pair
    docs = [list(range(3, 40)), list(range(50, 71))]
    kw = {"context": 16, "batch_size": 2, "shard_tokens": 20, "dtype": None, "progress": False,
          "features": ("delta", "delta_norm", "lens_topk"), "topk": 2}  # fmt: skip
    a = load_features(collect_to_disk(plain, docs, tmp_path / "plain", **kw))
    b = load_features(collect_to_disk(offloaded, docs, tmp_path / "offloaded", **kw))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_cpu_offload_hooks_keep_the_collector_exact():
    plain = tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=4)
    with torch.no_grad(), dx.collect(plain, ("delta",), topk=2) as ref:
        plain(input_ids=IDS, attention_mask=MASK)
    model = tiny_model("llama", num_layers=3, hidden=32, vocab=128, seed=4)
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    with torch.no_grad(), dx.collect(model, ("delta",), topk=2) as trace:
        model(input_ids=IDS, attention_mask=MASK)
    torch.testing.assert_close(trace.delta, ref.delta, atol=1e-5, rtol=1e-4)
    assert torch.equal(trace.topk_ids, ref.topk_ids)


@pytest.mark.parametrize("kv", ["recompute", "propagate", "verify"])
def test_early_exit_generate_on_an_offloaded_model_matches_the_plain_model(pair, kv):
    plain, offloaded = pair
    prompt = IDS[:1]
    outputs = []
    for model in (plain, offloaded):
        # back-off off: under verify it watches wall-clock time, which differs between the two (exit layers would)
        # and no n-gram drafts, so the drafts really exit early through the offloaded head
        policy = Verify(ngram=0) if kv == "verify" else kv
        ee = dx.EarlyExit(model, measure="softmax-max", threshold=0.0, kv=policy, backoff=False)
        out = ee.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
        outputs.append(out)
    a, b = outputs
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.exit_layers, b.exit_layers)
    assert (b.exit_layers < 4).any()  # some tokens really exited early, through the offloaded head
