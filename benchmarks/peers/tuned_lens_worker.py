"""tuned-lens worker: residuals from HF's ``output_hidden_states`` (how tuned-lens is fed), lens = ``LogitLens``.

tuned-lens has no hooks of its own. ``hidden_states[i]`` is block ``i``'s input, so the block
outputs are ``hidden_states[1:]``, whose last entry HF has already passed through the final norm.
A fresh ``TunedLens`` has zero-initialised translators (it equals the logit lens until trained on
data), so the logit lens is what is measured here; the lens is applied to the last block's true
output (read by the reference hooks) so that its error is the lens's, not the capture's.
"""

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
from tuned_lens.nn.lenses import LogitLens
lens = LogitLens.from_model(model)
hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
ins, outs = hidden[:-1], hidden[1:]  # outs[-1] is already normalised
logits = [lens(h, i) for i, h in enumerate(outs)]
"""


def version() -> str:
    return common.dist_version("tuned-lens")


@torch.no_grad()
def family(model: Any, sizes: dict[str, int]) -> dict[str, Any]:
    from tuned_lens.nn.lenses import LogitLens

    ids = common.input_ids(sizes["vocab"])
    logits, ref_in, ref_out = common.reference(model, ids)
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    entry: dict[str, Any] = {
        "lens": "LogitLens.from_model(model)(h, idx) = unembedding(final_norm(h))",
        "capture": common.capture_check(list(hidden[1:]), list(hidden[:-1]), ref_in, ref_out),
        "note": "capture: HF's hidden_states[-1] is the final-normed state, not the last block's output",
    }
    last, error = common.attempt(lambda: LogitLens.from_model(model)(ref_out[-1], len(ref_out) - 1))
    entry["lens_error"] = common.lens_error(last, logits) if error is None else {"error": error}
    return entry


def timing(spec: dict[str, Any]) -> dict[str, Any]:
    model, ids, settings = common.timing_setup(spec)
    gen = common.generate_kwargs(settings)

    def traced_forward() -> None:
        model(input_ids=ids, output_hidden_states=True)

    def traced_generate() -> None:
        out = model.generate(ids, output_hidden_states=True, return_dict_in_generate=True, **gen)
        assert len(out.hidden_states) == settings["new_tokens"], len(out.hidden_states)

    return common.time_both(
        lambda: model(input_ids=ids), traced_forward, lambda: model.generate(ids, **gen), traced_generate, settings
    )


if __name__ == "__main__":
    common.run_worker("tuned_lens", version, family, timing, SNIPPET)
