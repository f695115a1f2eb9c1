"""What the speed benchmarks (``verify_speed.py``, ``generate_speed.py``) share: flags, model and prompt loading,
and one JSON entry per timed row. The timing itself (alternated rounds, median ratio with its spread, the peer
rows ``assistant_early_exit`` and prompt lookup) is ``deltaexit.timing``, which the demo uses too.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from deltaexit.reference import available_references, load_reference, model_dir
from deltaexit.samples import sample_path
from deltaexit.timing import Timing, token_agreement

BASE = "model.generate"


def add_common_args(
    ap: argparse.ArgumentParser, *, prompts: int = 8, new_tokens: int = 64, prompt_len: int = 16
) -> None:
    """``--data``, ``--prompts``, ``--prompt-len``, ``--new-tokens``, ``--repeats``, ``--threads``, peer flags."""
    ap.add_argument(
        "--data",
        "--text",
        dest="data",
        type=Path,
        default=None,
        help="prompts: the first lines longer than 200 characters of this UTF-8 file (default: the shipped "
        "sample, deltaexit.samples.sample_path())",
    )
    ap.add_argument("--prompts", type=int, default=prompts, help="prompts (generate_speed: batches of each size)")
    ap.add_argument("--prompt-len", type=int, default=prompt_len)
    ap.add_argument("--new-tokens", type=int, default=new_tokens)
    ap.add_argument("--repeats", type=int, default=5, help="alternated timing rounds (figures: their median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (deltaexit.threads.torch_threads)")
    ap.add_argument(
        "--prompt-lookup", type=int, default=3, help="prompt_lookup_num_tokens of the prompt-lookup row (0: none)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON printed on stdout to this file")


def load_model(name: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` in fp32 eval mode from a shipped reference name or a local HF directory."""
    if name in available_references():
        return load_reference(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name!r}: neither a model directory nor one of {available_references()}")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def data_lines(path: Path | None, num: int, min_chars: int = 200) -> tuple[list[str], str]:
    """The first ``num`` lines longer than ``min_chars`` of ``path`` (default: the shipped sample), and a label."""
    path = path or sample_path()
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if len(line) > min_chars][:num]
    if len(lines) < num:
        raise SystemExit(f"{path} has {len(lines)} lines longer than {min_chars} characters; asked for {num}")
    return lines, f"first {num} lines of {path} longer than {min_chars} characters"


def read_prompts(tokenizer: Any, path: Path | None, num: int, prompt_len: int) -> tuple[list[torch.Tensor], str]:
    """``num`` prompts of ``prompt_len`` tokens (``[1, prompt_len]`` each) from :func:`data_lines`, and a label."""
    lines, label = data_lines(path, num)
    prompts = [tokenizer(line, return_tensors="pt").input_ids[:, :prompt_len] for line in lines]
    return prompts, f"first {prompt_len} tokens of the {label}"


def sequences(out: Any) -> torch.Tensor:
    """The token ids of a ``generate`` result (a tensor, or an output with ``.sequences``)."""
    return getattr(out, "sequences", out)


def row_entry(timing: Timing, name: str, prompts: list[torch.Tensor]) -> dict[str, Any]:
    """One row's figures against ``model.generate``: speed and decode speed (median + spread), agreement.

    A row that failed to run is ``{"row": name, "error": text}``.
    """
    if name in timing.errors:
        return {"row": name, "error": timing.errors[name]}
    outs = [sequences(o) for o in timing.outputs[name]]
    refs = [sequences(o) for o in timing.outputs[BASE]]
    pairs = list(zip(outs, refs, prompts, strict=True))
    return {
        "row": name,
        "speed": timing.speed(name, BASE),
        "decode_speed": timing.speed(name, BASE, decode=True),
        "per_prompt": [round(x, 3) for x in timing.per_input_speed(name, BASE)],
        "agreement": sum(token_agreement(o, r, p.shape[-1]) for o, r, p in pairs) / len(pairs),
        "identical": all(torch.equal(o, r) for o, r, _ in pairs),
    }


def emit(result: dict[str, Any], path: str | Path | None) -> None:
    """Print a benchmark's JSON result and, with ``path``, write it there atomically."""
    import json

    from deltaexit.io import atomic_write_json
    from deltaexit.jsonable import json_clean

    result = json_clean(result)
    if path:
        atomic_write_json(path, result)
    print(json.dumps(result, indent=1))
