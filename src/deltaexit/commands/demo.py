"""``deltaexit demo``: the whole pipeline on an embedded reference model, offline.

1. Saturation and confidence-measure summary (``dx.analyze``) on the shipped WikiText-2 sample.
2. Generation side by side, batch 1, measured in this run: ``model.generate``, transformers' own LayerSkip
   (``assistant_early_exit``) and prompt lookup, ``dx`` lossless ``verify`` and a calibrated lossy setting,
   with speed (median ratio to ``model.generate`` over alternated rounds, with its min-max spread), agreement
   with ``model.generate`` and mean layers run. ``--json PATH`` writes these rows.

Each row of section 2 is built by one small function (``*_row`` below).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

DEMO_MEASURES = ("softmax-max", "state-cosine", "delta-norm", "hdelta-mlp", "lens-mlp")
#: Rows slower than this (median) get a printed line saying why.
SLOW = 0.97
#: Token disagreement the calibrated row is tuned for.
DELTA = 0.01


def default_model() -> str:
    """``"v3"`` when this installation ships it (12 layers, 256 wide, LayerSkip-trained), else ``"v2"``."""
    from deltaexit.reference import available_references

    return "v3" if "v3" in available_references() else "v2"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo on the embedded reference model",
        description="Saturation/measure summary, then early exit and transformers' own speed-ups next to "
        "model.generate, on an embedded reference model (no network, no data directory needed).",
    )
    parser.add_argument("--model", default=None, help="embedded reference name or HF directory (default: v3, else v2)")
    parser.add_argument("--tokens", type=int, default=1024, help="test tokens for the measure summary (0: skip it)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts from the shipped sample, batch 1 each")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per prompt")
    parser.add_argument("--repeats", type=int, default=5, help="alternated timing rounds (speed: their median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the generation rows to this JSON file")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


@dataclass
class DemoRow:
    """One row of the generation table: a timed call and what it is."""

    name: str
    setting: str
    call: Any  # deltaexit.timing.Row
    early_exit: Any = None  # the EarlyExit behind a dx row (its stats give layers and drafts)


def _call(generator: Any, kw: dict[str, Any]) -> Any:
    """``generator.generate(ids, streamer=..., **kw)`` as a timed row (a model, or an EarlyExit)."""
    from deltaexit.timing import generate_row

    return generate_row(generator, kw)


def baseline_row(model: Any, kw: dict[str, Any]) -> DemoRow:
    """Plain ``model.generate``: the base every speed is a ratio to."""
    return DemoRow("model.generate", "greedy, full depth", _call(model, kw))


def layerskip_row(model: Any, kw: dict[str, Any], exit_layer: int, tokens: int = 4) -> DemoRow:
    """transformers' own LayerSkip: ``model.generate(..., assistant_early_exit=E, num_assistant_tokens=k)``."""
    from deltaexit.timing import layerskip_row as call

    return DemoRow("assistant_early_exit", f"E={exit_layer}, k={tokens}", call(model, kw, exit_layer, tokens))


def prompt_lookup_row(model: Any, kw: dict[str, Any], tokens: int = 3) -> DemoRow:
    """transformers' prompt-lookup decoding (n-gram drafts from the prompt), training-free and lossless."""
    return DemoRow("prompt_lookup", f"{tokens} tokens", _call(model, {**kw, "prompt_lookup_num_tokens": tokens}))


def dx_row(name: str, setting: str, ee: Any, kw: dict[str, Any]) -> DemoRow:
    """A row for the ``EarlyExit`` ``ee`` (its output dicts carry the stats the table reads)."""
    return DemoRow(name, setting, _call(ee, {**kw, "return_dict_in_generate": True}), ee)


#: The demo's tuning search (small, so the demo stays a few minutes; ``deltaexit tune`` searches wider).
DEMO_TUNE: dict[str, Any] = {
    "exit_layers": (1, 2),
    "draft_settings": ({"num_draft": 4},),
    "verify_thresholds": (),  # fixed-layer drafts were the faster ones on v2 and v3 (docs/tune.md)
    "timing_prompts": 4,
    "screen_prompts": 2,
    "keep": 2,
    "repeats": 3,
    "budget_s": 60.0,
    "progress": False,
}


def tuned_row(name: str, model: Any, calibration: list[Any], kw: dict[str, Any], tolerance: float) -> DemoRow:
    """``dx.tune(model, calibration, tolerance)``'s choice, as a row timed on the demo's (held-out) prompts."""
    from deltaexit.generation.early_exit import EarlyExit
    from deltaexit.tuning.api import tune

    result = tune(model, calibration, tolerance, max_new_tokens=kw["max_new_tokens"], **DEMO_TUNE)
    ee = result.early_exit(model)
    if ee is None:  # model.generate won the search: say so and run full depth
        ee = EarlyExit(model, "softmax-max", float("inf"), "verify")
        return dx_row(name, "tuned: no early exit (model.generate was fastest)", ee, kw)
    return dx_row(name, f"tuned: {result.chosen.name if result.chosen else ee}", ee, kw)


def lossless_row(model: Any, calibration: list[Any], kw: dict[str, Any]) -> DemoRow:
    """``dx`` lossless ``verify`` chosen by ``dx.tune(tolerance=0)``: identical output to ``model.generate``."""
    return tuned_row("dx verify (lossless)", model, calibration, kw, 0.0)


def calibrated_row(model: Any, calibration: list[Any], kw: dict[str, Any]) -> DemoRow:
    """``dx.tune(tolerance=DELTA)``: the fastest setting whose Learn-then-Test certified disagreement is <= DELTA."""
    return tuned_row(f"dx calibrated d={DELTA}", model, calibration, kw, DELTA)


def build_rows(model: Any, tokenizer: Any, calibration: list[str], kw: dict[str, Any]) -> list[DemoRow]:
    """The table's rows, ``model.generate`` first; ``calibration`` prompts are not the measured ones."""
    from deltaexit.structure import find_structure

    exit_layer = min(2, find_structure(model).num_layers)  # its fastest draft layer (docs/generate.md)
    calibration_ids = [tokenizer(p, return_tensors="pt").input_ids[0] for p in calibration]
    return [
        baseline_row(model, kw),
        layerskip_row(model, kw, exit_layer),
        prompt_lookup_row(model, kw),
        lossless_row(model, calibration_ids[:8], kw),
        calibrated_row(model, calibration_ids, kw),
    ]


def _sequences(out: Any) -> Any:
    return getattr(out, "sequences", out)


def measure_rows(rows: list[DemoRow], prompts: list[Any], repeats: int, num_layers: int) -> list[dict[str, Any]]:
    """Time ``rows`` alternately on ``prompts``; one JSON-ready dict per row (errors kept, not raised)."""
    import torch

    from deltaexit.timing import alternated

    timing = alternated({r.name: r.call for r in rows}, prompts, repeats=repeats)
    ref = [_sequences(o) for o in timing.outputs[rows[0].name]]
    result = []
    for r in rows:
        entry: dict[str, Any] = {"row": r.name, "setting": r.setting}
        if r.name in timing.errors:
            entry["error"] = timing.errors[r.name]
            result.append(entry)
            continue
        outs = timing.outputs[r.name]
        seqs = [_sequences(o) for o in outs]
        entry["speed"] = timing.speed(r.name, rows[0].name)
        entry["agreement"] = _agreement(seqs, ref, prompts)
        entry["identical"] = all(torch.equal(s, f) for s, f in zip(seqs, ref, strict=True))
        entry["mean_layers"] = _mean_layers(r, outs, num_layers)
        if r.early_exit is not None:
            entry["accepted"] = sum(o.stats.accepted for o in outs)
            entry["drafted"] = sum(o.stats.drafted for o in outs)
            entry["measure_blocks_per_call"] = outs[0].stats.measure_block_fraction
        result.append(entry)
    return result


def _agreement(seqs: list[Any], ref: list[Any], prompts: list[Any]) -> float:
    from deltaexit.timing import token_agreement

    return sum(token_agreement(s, f, p.shape[1]) for s, f, p in zip(seqs, ref, prompts, strict=True)) / len(ref)


def _mean_layers(row: DemoRow, outs: list[Any], num_layers: int) -> float | None:
    """Mean layers run per generated token: ``L`` for full-depth rows, the exit layers for ``dx`` rows."""
    if row.early_exit is not None:
        return sum(o.stats.mean_exit_layer for o in outs) / len(outs)
    if row.name in ("model.generate", "prompt_lookup"):
        return float(num_layers)
    return None  # transformers does not report how many draft tokens its LayerSkip kept


def why_slow(entry: dict[str, Any], num_layers: int, head_blocks: float) -> str | None:
    """A line saying why a row runs below :data:`SLOW` times ``model.generate`` (None when it does not)."""
    if "error" in entry:
        return f"{entry['row']}: did not run on this model ({entry['error']})"
    speed = entry["speed"]
    if speed["median"] >= SLOW or entry["row"] == "model.generate":
        return None
    reasons = []
    if speed["max"] >= 1.0:
        reasons.append(f"its rounds ranged {speed['min']:.2f}-{speed['max']:.2f}x, so part of the gap is noise")
    if entry.get("drafted"):
        reasons.append(f"{entry['accepted']}/{entry['drafted']} drafts were accepted (a rejected one is wasted work)")
    if entry.get("measure_blocks_per_call", 0.0) > 0.5:
        reasons.append(f"its measure costs {entry['measure_blocks_per_call']:.2f} blocks per scored layer")
    if entry["row"] == "assistant_early_exit":
        reasons.append("transformers drafts and verifies in separate passes, each paying the LM head")
    if entry["row"] == "prompt_lookup":
        reasons.append("this text repeats few n-grams, so there is little to look up")
    reasons.append(f"the LM head costs {head_blocks:.1f} blocks of compute per token on top of the {num_layers}")
    return f"{entry['row']} at {speed['median']:.2f}x: " + "; ".join(reasons)


def print_rows(rows: list[dict[str, Any]], num_layers: int, head_blocks: float) -> None:
    """The side-by-side table, then a line for every row below :data:`SLOW`."""
    print(f"{'row':>22} {'setting':>36} {'speed (min-max)':>19} {'agreement':>9} {'layers':>6}")
    for e in rows:
        if "error" in e:
            print(f"{e['row']:>22} {e['setting']:>36} {'error':>19}")
            continue
        s = e["speed"]
        speed = f"{s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f})"
        layers = "-" if e["mean_layers"] is None else f"{e['mean_layers']:.2f}"
        print(f"{e['row']:>22} {e['setting']:>36} {speed:>19} {e['agreement']:>9.3f} {layers:>6}")
    lines = [line for e in rows if (line := why_slow(e, num_layers, head_blocks))]
    if lines:
        print("\nbelow 0.97x:\n" + "\n".join(f"  {line}" for line in lines))


def _analysis(model: Any, tokenizer: Any, tokens: int, seed: int) -> None:
    from deltaexit.analysis import analyze, format_report
    from deltaexit.samples import sample_text

    print("== 1. Saturation and confidence measures (labels: next and final) ==")
    result = analyze(
        model,
        tokenizer,
        sample_text(),
        tokens=tokens,
        fit_tokens=2 * tokens,
        labels=("next", "final"),
        measures=DEMO_MEASURES,
        seed=seed,
        fit_kwargs={"max_epochs": 30},
    )
    print(format_report(result))


def run(args: argparse.Namespace) -> int:
    import torch

    from deltaexit._version import __version__
    from deltaexit.commands.common import load_model_and_tokenizer
    from deltaexit.generation.cost import CostModel
    from deltaexit.io import atomic_write_json
    from deltaexit.jsonable import json_clean
    from deltaexit.samples import sample_prompts
    from deltaexit.structure import find_structure
    from deltaexit.threads import torch_threads

    if args.prompts < 1 or args.repeats < 1 or args.new_tokens < 1:
        raise ValueError("--prompts, --repeats and --new-tokens must be >= 1")
    name = args.model or default_model()
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(name)  # a shipped name or a directory; float32, one-line errors
    num_layers = find_structure(model).num_layers
    print(f"deltaexit {__version__} demo: model {name!r} ({num_layers} layers), shipped WikiText-2 sample\n")
    with torch_threads(args.threads):
        if args.tokens > 0:
            _analysis(model, tokenizer, args.tokens, args.seed)
        texts = sample_prompts(words=12)  # the first --prompts are timed; the rest calibrate (held out)
        prompts = [tokenizer(p, return_tensors="pt").input_ids for p in texts[: args.prompts]]
        kw = {"max_new_tokens": args.new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        rows = build_rows(model, tokenizer, texts[args.prompts :], kw)
        print(f"\n== 2. Generation vs model.generate: {args.prompts} prompts x {args.new_tokens} tokens, batch 1 ==")
        with _quiet_transformers():  # assisted generation's deprecation notices would break up the table
            measured = measure_rows(rows, prompts, args.repeats, num_layers)
    head_blocks = CostModel.from_model(model).head_blocks
    print_rows(measured, num_layers, head_blocks)
    print(
        f"\nspeed = model.generate time / row time over all prompts, median (min-max) of {args.repeats} rounds "
        f"in which the rows alternate; {args.threads} thread(s), this machine. agreement = share of "
        "model.generate's tokens reproduced; verify is lossless by construction."
    )
    if args.json:
        record = {"model": name, "num_layers": num_layers, "prompts": args.prompts, "new_tokens": args.new_tokens}
        record |= {"repeats": args.repeats, "threads": args.threads, "rows": measured}
        atomic_write_json(args.json, json_clean(record))
        print(f"wrote {args.json}")
    return 0


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
