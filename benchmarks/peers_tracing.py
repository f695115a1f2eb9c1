"""Side-by-side comparison with the tracing peers: nnsight, nnterp, TransformerLens's bridge, tuned-lens.

Each peer runs in its own virtual environment (they pin different libraries); this driver runs
``benchmarks/peers/<peer>_worker.py`` with that environment's python, passing a JSON spec, and
collects what each worker prints. A peer whose environment is missing is skipped and says so.
deltaexit's own worker runs with the current interpreter and this checkout's ``src/``.

Every worker builds the same tiny random models from configs (seed 0; llama, gpt2, gemma2 with
``final_logit_softcapping``, granite with ``logits_scaling``, cohere with ``logit_scale``, opt with
``project_out``, qwen2, mistral, phi3, gpt_neox) and measures, against plain forward hooks on the
same model:

* capture: every block's input and output, exactly (1e-5);
* lens error: the peer's own (or documented) logit lens on the last block's output against the
  model's logits, max abs and relative to the largest logit;
* overhead: forward and ``generate`` with capture against the plain call, as median ratios of
  alternated repeats in one process, one torch thread, with their interquartile range;
* lines of user code for "capture every block's residual and apply the lens" (the snippet each
  worker keeps, non-blank lines).

Usage:
    python benchmarks/peers_tracing.py [--envs /work/peer-envs] [--out docs/results/peers_tracing.json]
        [--markdown docs/peers.md] [--peers deltaexit,nnsight,...] [--families llama,gemma2,...]
    python benchmarks/peers_tracing.py --render docs/results/peers_tracing.json --markdown docs/peers.md
    python benchmarks/peers_tracing.py --print-setup     # the commands that create the environments
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "peers"
PEERS: tuple[str, ...] = ("deltaexit", "nnsight", "nnterp", "transformer_lens", "tuned_lens")
DEFAULT_ENVS = os.environ.get("DELTAEXIT_PEER_ENVS", "/work/peer-envs")

#: How each environment was made (``python3.11 -m venv <envs>/<peer>`` first). torch is the CPU wheel.
SETUP: dict[str, list[str]] = {
    "nnsight": ["pip install torch==2.13.0", "pip install nnsight"],
    "nnterp": ["pip install torch==2.13.0", "pip install nnterp", "pip install nnsight==0.7.0"],
    "transformer_lens": ["pip install torch==2.13.0", "pip install transformer_lens"],
    "tuned_lens": ["pip install torch==2.13.0", "pip install tuned-lens"],
}

#: What the installs ran into (recorded with the results).
INSTALL_NOTES: dict[str, str] = {
    "deltaexit": "this checkout's src/ on the project's environment",
    "nnsight": "pip's pick",
    "nnterp": (
        "`pip install nnterp` pulls nnsight 0.8.1, with which nnterp 1.3.0 fails to import "
        "(ModuleNotFoundError: nnsight.intervention.tracing); pinned nnsight==0.7.0"
    ),
    "transformer_lens": "pip's pick (4.x has TransformerBridge; no pre-release needed)",
    "tuned_lens": "pip's pick",
}

LOGIT_TRANSFORM_FAMILIES = ("gemma2", "granite", "cohere", "opt")


def worker_path(peer: str) -> Path:
    """The worker script of ``peer``.

    Example:
        >>> worker_path("nnsight").name
        'nnsight_worker.py'
    """
    if peer not in PEERS:
        raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    return WORKERS / f"{peer}_worker.py"


def peer_python(peer: str, envs: str) -> str:
    """The interpreter a peer runs under: the current one for deltaexit, else ``<envs>/<peer>/bin/python``."""
    if peer == "deltaexit":
        return sys.executable
    return str(Path(envs) / peer / "bin" / "python")


def run_peer(peer: str, python: str, spec: dict[str, Any], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run one peer's worker under ``python`` with ``spec``; its JSON, or why there is none.

    Args:
        peer: One of :data:`PEERS`.
        python: The interpreter of the peer's environment.
        spec: Passed to the worker as JSON (``families``, ``timing``, ``timing_settings``, ...).
        timeout: Seconds before the worker is stopped.
    """
    worker = worker_path(peer)
    if not Path(python).exists():
        return {"peer": peer, "skipped": f"not installed: no interpreter at {python}"}
    env = dict(os.environ)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if peer == "deltaexit":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [python, str(worker), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        return {"peer": peer, "error": f"worker ran past {timeout:.0f} s"}
    seconds = round(time.perf_counter() - start, 1)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"peer": peer, "error": f"worker exited {proc.returncode}", "stderr": proc.stderr[-2000:]}
    result = json.loads(lines[-1])
    result["install"] = INSTALL_NOTES.get(peer, "")
    result["seconds"] = seconds
    return result


def sweep(peers: list[str], envs: str, spec: dict[str, Any], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run every peer in turn (never two at once: the overhead ratios need a quiet machine)."""
    results = {}
    for peer in peers:
        print(f"[peers] {peer} ...", file=sys.stderr, flush=True)
        results[peer] = run_peer(peer, peer_python(peer, envs), spec, timeout=timeout)
    return {
        "spec": spec,
        "command": "python benchmarks/peers_tracing.py " + " ".join(sys.argv[1:]),
        "setup": SETUP,
        "peers": results,
    }


# -- rendering -----------------------------------------------------------------------------------
def _short(text: str, n: int = 48) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _capture_cell(entry: dict[str, Any]) -> str:
    if not entry.get("built", True):
        return "n/a (no build)"
    if "capture" not in entry:
        return "error: " + _short(entry.get("error", "?"))
    capture = entry["capture"]
    if capture.get("ok"):
        return "yes"
    if "error" in capture:
        return "error: " + _short(capture["error"])
    wrong = capture.get("wrong_blocks")
    if wrong:
        return f"no: block {', '.join(map(str, wrong))} output differs"
    return f"no: {capture.get('blocks')} of {capture.get('expected')} blocks"


def _lens_cell(entry: dict[str, Any]) -> str:
    if not entry.get("built", True):
        return "n/a"
    lens = entry.get("lens_error")
    if lens is None:
        return "error: " + _short(entry.get("error", "?"))
    if "error" in lens:
        return "fails: " + _short(lens["error"], 40)
    if lens["max_abs"] < 1e-4:
        return f"{lens['max_abs']:.0e}" if lens["max_abs"] else "0"
    return f"**{lens['max_abs']:.2f}** ({100 * lens['relative']:.0f}%)"


def _ratio_cell(timing: dict[str, Any] | None, key: str) -> str:
    if not timing or key not in timing:
        return "error: " + _short((timing or {}).get("error", "not run"))
    t = timing[key]
    low, high = t["ratio_iqr"]
    return f"{t['ratio']:.2f} ({low:.2f}–{high:.2f})"


def _sizes(sizes: dict[str, int]) -> str:
    if not sizes:
        return ""
    return f"{sizes['layers']} blocks × {sizes['hidden']} wide, vocabulary {sizes['vocab']}"


def render(results: dict[str, Any]) -> str:
    """The markdown tables of a sweep's results."""
    peers = {p: r for p, r in results["peers"].items()}
    ran = [p for p, r in peers.items() if "families" in r]
    families: list[str] = []
    for p in ran:
        families += [f for f in peers[p]["families"] if f not in families]
    out = []
    out.append("| peer | version | transformers | torch | install |")
    out.append("| --- | --- | --- | --- | --- |")
    for p, r in peers.items():
        if p in ran:
            v = r["versions"]
            out.append(f"| {p} | {v['peer']} | {v['transformers']} | {v['torch']} | {r.get('install', '')} |")
        else:
            out.append(f"| {p} | – | – | – | {_short(r.get('skipped') or r.get('error', ''), 80)} |")
    header = "| family | " + " | ".join(ran) + " |"
    rule = "| --- |" + " --- |" * len(ran)
    out += ["", "**Capture of every block's input and output** (exact to 1e-5 against plain hooks):", ""]
    out += [header, rule]
    for f in families:
        cells = [_capture_cell(peers[p]["families"].get(f, {"built": False})) for p in ran]
        out.append(f"| {f} | " + " | ".join(cells) + " |")
    out += ["", "**Last-layer lens error** (max abs against the model's logits; relative to the largest logit):", ""]
    out += [header, rule]
    for f in families:
        cells = [_lens_cell(peers[p]["families"].get(f, {"built": False})) for p in ran]
        name = f"{f} (logit transform)" if f in LOGIT_TRANSFORM_FAMILIES else f
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    settings: dict[str, Any] = next(
        (peers[p]["timing"].get("settings") for p in ran if "settings" in peers[p].get("timing", {})), {}
    )
    out += [
        "",
        "**Overhead** (traced / plain, median of alternated repeats in the same process, interquartile range; "
        f"{settings.get('family', '?')} {_sizes(settings.get('sizes', {}))}, "
        f"prompt {settings.get('length', '?')} tokens, "
        f"{settings.get('new_tokens', '?')} new tokens, 1 thread) and **lines of user code**:",
        "",
        "| peer | forward | generate | plain forward ms | plain generate ms | lines |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in ran:
        t = peers[p].get("timing", {})
        fwd_ms = t.get("forward", {}).get("plain_ms", "–")
        gen_ms = t.get("generate", {}).get("plain_ms", "–")
        out.append(
            f"| {p} | {_ratio_cell(t, 'forward')} | {_ratio_cell(t, 'generate')} | {fwd_ms} | {gen_ms} | "
            f"{peers[p]['user_code_lines']} |"
        )
    grouped: dict[tuple[str, str], list[str]] = {}
    for p in ran:
        for f, e in peers[p]["families"].items():
            text = "; ".join(_short(str(e[k]), 160) for k in ("wrap_error", "note") if k in e)
            if text:
                grouped.setdefault((p, text), []).append(f)
    notes = [f"- {p} ({', '.join(fams)}): {text}" for (p, text), fams in grouped.items()]
    if notes:
        out += ["", "Notes recorded by the workers:", "", *notes]
    out += ["", "The user code each worker runs (counted above, non-blank lines):", ""]
    for p in ran:
        out += [f"{p}:", "", "```python", peers[p]["snippet"].rstrip(), "```", ""]
    return "\n".join(out).rstrip() + "\n"


START, END = "<!-- peers-table:start -->", "<!-- peers-table:end -->"


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    """Put the rendered tables between the markers of ``path`` (or the whole file if it has none)."""
    block = f"{START}\n{render(results)}{END}"
    text = path.read_text() if path.exists() else ""
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    path.write_text(text)


def print_setup(envs: str) -> None:
    """Print the shell commands that create the peer environments."""
    for peer, steps in SETUP.items():
        print(f"python3.11 -m venv {envs}/{peer}")
        for step in steps:
            print(f"{envs}/{peer}/bin/{step}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", default=DEFAULT_ENVS, help="folder holding one venv per peer")
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--families", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--no-timing", action="store_true", help="skip the overhead measurement")
    parser.add_argument("--forward-repeats", type=int, default=None)
    parser.add_argument("--generate-repeats", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per worker")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    parser.add_argument("--markdown", type=Path, default=None, help="render the tables into this markdown file")
    parser.add_argument("--render", type=Path, default=None, help="render saved results instead of running")
    parser.add_argument("--print-setup", action="store_true", help="print the commands creating the envs")
    args = parser.parse_args(argv)
    if args.print_setup:
        print_setup(args.envs)
        return 0
    if args.render is not None:
        results = json.loads(args.render.read_text())
    else:
        spec: dict[str, Any] = {"threads": 1, "timing": not args.no_timing, "timing_settings": {}}
        if args.families:
            spec["families"] = args.families.split(",")
        if args.forward_repeats:
            spec["timing_settings"]["forward_repeats"] = args.forward_repeats
        if args.generate_repeats:
            spec["timing_settings"]["generate_repeats"] = args.generate_repeats
        results = sweep(args.peers.split(","), args.envs, spec, timeout=args.timeout)
        print(json.dumps(results, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown is not None:
        write_markdown(args.markdown, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
