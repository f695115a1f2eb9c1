"""nnsight worker: ``model.trace`` saves every block's input and output; the lens is ``lm_head(norm(h))``."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

warnings.filterwarnings("ignore")

SNIPPET = """\
from nnsight import TransformersModel
lm = TransformersModel(model, tokenizer=tokenizer, task="text-generation")
outs, ins = [], []
with lm.trace(ids):
    for layer in lm.model.layers:
        ins.append(layer.input.save())
        outs.append(layer.output.save())
    lens = [lm.lm_head(lm.model.norm(h)).save() for h in outs]
"""


def version() -> str:
    return common.dist_version("nnsight")


def wrap(model: Any, vocab: int):
    from nnsight import TransformersModel

    return TransformersModel(model, tokenizer=common.tiny_tokenizer(vocab), task="text-generation")


@torch.no_grad()
def family(model: Any, sizes: dict[str, int]) -> dict[str, Any]:
    layers_path, norm_path, head_path = common.MODULE_PATHS[common.family_of(model)]
    ids = common.input_ids(sizes["vocab"])
    logits, ref_in, ref_out = common.reference(model, ids)
    lm = wrap(model, sizes["vocab"])
    layers, norm, head = (common.attr_path(lm, p) for p in (layers_path, norm_path, head_path))
    outs: list[Any] = []
    ins: list[Any] = []
    with lm.trace(ids):
        for layer in layers:
            ins.append(layer.input.save())
            outs.append(layer.output.save())
    blocks_out = [common.hidden_of(h) for h in outs]
    blocks_in = [common.hidden_of(h) for h in ins]
    entry: dict[str, Any] = {"capture": common.capture_check(blocks_out, blocks_in, ref_in, ref_out)}
    entry["lens"] = f"{head_path}({norm_path}(h))"

    def lens() -> torch.Tensor:
        with lm.trace(ids):
            last = head(norm(common.hidden_of(layers[-1].output))).save()
        return last

    last, error = common.attempt(lens)
    entry["lens_error"] = common.lens_error(last, logits) if error is None else {"error": error}
    return entry


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    model, ids, settings = common.timing_setup(spec)
    gen = common.generate_kwargs(settings)
    lm = wrap(model, settings["sizes"]["vocab"])

    def traced_forward() -> None:
        outs = []
        with lm.trace(ids):
            for layer in lm.model.layers:
                outs.append(layer.output.save())

    def traced_generate() -> None:
        outs = []
        with lm.generate(ids, **gen) as tracer:
            for _ in tracer.iter[:]:
                for layer in lm.model.layers:
                    outs.append(layer.output.save())
        expected = settings["new_tokens"] * settings["sizes"]["layers"]
        assert len(outs) == expected, (len(outs), expected)

    return common.time_both(
        lambda: model(input_ids=ids), traced_forward, lambda: model.generate(ids, **gen), traced_generate, settings
    )


if __name__ == "__main__":
    common.run_worker("nnsight", version, family, timing, SNIPPET)
