"""TransformerLens worker: ``TransformerBridge`` over the HF model, ``run_with_cache`` and its documented logit lens.

The lens is ``bridge.unembed(cache.accumulated_resid(apply_ln=True))``; capture during generation
is ``bridge.generate(..., return_cache=True)`` (one extra forward over prompt + completion).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

SNIPPET = """\
from transformer_lens.model_bridge import TransformerBridge
bridge = TransformerBridge.boot_transformers(path, hf_model=model, tokenizer=tokenizer)
logits, cache = bridge.run_with_cache(ids)
outs = [cache[f"blocks.{i}.hook_resid_post"] for i in range(bridge.cfg.n_layers)]
ins = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(bridge.cfg.n_layers)]
lens = bridge.unembed(cache.accumulated_resid(apply_ln=True))
"""


def version() -> str:
    return common.dist_version("transformer_lens")


def wrap(model: Any, vocab: int):
    from transformer_lens.model_bridge import TransformerBridge

    path = tempfile.mkdtemp(prefix="tl_tokenizer_")  # a local tokenizer: nothing is fetched from a hub
    return TransformerBridge.boot_transformers(path, hf_model=model, tokenizer=common.saved_tiny_tokenizer(vocab, path))


@torch.no_grad()
def family(model: Any, sizes: dict[str, int]) -> dict[str, Any]:
    ids = common.input_ids(sizes["vocab"])
    logits, ref_in, ref_out = common.reference(model, ids)
    entry: dict[str, Any] = {"lens": "bridge.unembed(cache.accumulated_resid(apply_ln=True))[-1]"}
    bridge, error = common.attempt(lambda: wrap(model, sizes["vocab"]))
    if error is not None:
        return {**entry, "error": error}
    bridge_logits, cache = bridge.run_with_cache(ids)
    layers = bridge.cfg.n_layers
    outs = [cache[f"blocks.{i}.hook_resid_post"] for i in range(layers)]
    ins = [cache[f"blocks.{i}.hook_resid_pre"] for i in range(layers)]
    entry["capture"] = common.capture_check(outs, ins, ref_in, ref_out)
    entry["bridge_logits_error"] = common.lens_error(bridge_logits, logits)
    lens, error = common.attempt(lambda: bridge.unembed(cache.accumulated_resid(apply_ln=True)))
    entry["lens_error"] = common.lens_error(lens[-1], logits) if error is None else {"error": error}
    return entry


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    model, ids, settings = common.timing_setup(spec)
    gen = common.generate_kwargs(settings)
    bridge = wrap(model, settings["sizes"]["vocab"])

    def resid_post(name: str) -> bool:
        return name.endswith("hook_resid_post")

    def traced_forward() -> None:
        bridge.run_with_cache(ids, names_filter=resid_post)

    def traced_generate() -> None:
        out, _cache = bridge.generate(
            ids,
            max_new_tokens=settings["new_tokens"],
            do_sample=False,
            stop_at_eos=False,
            verbose=False,
            return_cache=True,
            names_filter=resid_post,
        )
        assert out.shape[1] == ids.shape[1] + settings["new_tokens"], out.shape

    return common.time_both(
        lambda: model(input_ids=ids), traced_forward, lambda: model.generate(ids, **gen), traced_generate, settings
    )


if __name__ == "__main__":
    common.run_worker("transformer_lens", version, family, timing, SNIPPET)
