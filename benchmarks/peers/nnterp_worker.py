"""nnterp worker: ``StandardizedTransformer`` accessors (``layers_input``/``layers_output``), ``project_on_vocab``."""

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
from nnterp import StandardizedTransformer
st = StandardizedTransformer(model, tokenizer=tokenizer)
outs, ins = [], []
with st.trace(ids):
    for i in range(st.num_layers):
        ins.append(st.layers_input[i].save())
        outs.append(st.layers_output[i].save())
    lens = [st.project_on_vocab(h).save() for h in outs]
"""


def version() -> str:
    return f"{common.dist_version('nnterp')} (nnsight {common.dist_version('nnsight')})"


def wrap(model: Any, vocab: int, **kwargs: Any):
    from nnterp import StandardizedTransformer

    return StandardizedTransformer(model, tokenizer=common.tiny_tokenizer(vocab), **kwargs)


@torch.no_grad()
def family(model: Any, sizes: dict[str, int]) -> dict[str, Any]:
    ids = common.input_ids(sizes["vocab"])
    logits, ref_in, ref_out = common.reference(model, ids)
    entry: dict[str, Any] = {"lens": "project_on_vocab(h) = lm_head(ln_final(h))"}
    st, error = common.attempt(lambda: wrap(model, sizes["vocab"]))
    if error is not None:
        # The documented default validates the renaming; record its refusal, then try without it.
        entry["wrap_error"] = error
        st, error = common.attempt(lambda: wrap(model, sizes["vocab"], check_renaming=False))
        if error is not None:
            return {**entry, "error": error}
        entry["note"] = "wrapped with check_renaming=False"
    outs: list[Any] = []
    ins: list[Any] = []

    def capture() -> None:
        with st.trace(ids):
            for i in range(st.num_layers):
                ins.append(st.layers_input[i].save())
                outs.append(st.layers_output[i].save())

    _, error = common.attempt(capture)
    if error is not None:
        entry["capture"] = {"ok": False, "error": error}
    else:
        blocks_out = [common.hidden_of(h) for h in outs]
        blocks_in = [common.hidden_of(h) for h in ins]
        entry["capture"] = common.capture_check(blocks_out, blocks_in, ref_in, ref_out)

    def lens() -> torch.Tensor:
        with st.trace(ids):
            last = st.project_on_vocab(st.layers_output[st.num_layers - 1]).save()
        return last

    last, error = common.attempt(lens)
    entry["lens_error"] = common.lens_error(last, logits) if error is None else {"error": error}
    return entry


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    model, ids, settings = common.timing_setup(spec)
    gen = common.generate_kwargs(settings)
    st = wrap(model, settings["sizes"]["vocab"])

    def traced_forward() -> None:
        outs = []
        with st.trace(ids):
            for i in range(st.num_layers):
                outs.append(st.layers_output[i].save())

    def traced_generate() -> None:
        outs = []
        with st.generate(ids, **gen) as tracer:
            for _ in tracer.iter[:]:
                for i in range(st.num_layers):
                    outs.append(st.layers_output[i].save())
        expected = settings["new_tokens"] * settings["sizes"]["layers"]
        assert len(outs) == expected, (len(outs), expected)

    return common.time_both(
        lambda: model(input_ids=ids), traced_forward, lambda: model.generate(ids, **gen), traced_generate, settings
    )


if __name__ == "__main__":
    common.run_worker("nnterp", version, family, timing, SNIPPET)
