"""``deltaexit collect`` end to end: a saved model directory, a text file, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltaexit.cli import main
from deltaexit.streaming import Manifest, load_features
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


TEXT = [
    "the cat sat on the mat and the dog sat on the log",
    "",
    "a bird flew over the house while the cat watched from the mat",
    "the dog ran after the bird but the bird flew away over the trees",
    "in the house the cat slept and the dog slept by the door",
]


def save_model_dir(path: Path, *, num_layers: int = 3) -> Path:
    """A tiny llama and a word-level tokenizer saved as an ordinary HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for line in TEXT for w in line.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tiny_model("llama", num_layers=num_layers, hidden=32, vocab=64, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_corpus(path: Path, repeat: int) -> Path:
    lines = [line if not line else f"{line} {i}" for i in range(repeat) for line in TEXT]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deltaexit", "collect", *args]


def test_collect_command_writes_a_complete_collection_and_resumes(tmp_path, capsys):
    model_dir = save_model_dir(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.txt", repeat=3)
    common = ["--model", str(model_dir), "--data", str(data), "--context", "8", "--shard-tokens", "40",
              "--features", "delta_norm,lens_topk", "--topk", "2", "--no-progress"]  # fmt: skip
    assert main(["collect", *common, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = Manifest.load(tmp_path / "out")
    assert summary["tokens"] == manifest.num_tokens > 0 and summary["shards"] == len(manifest.shards) > 1
    assert manifest.settings["features"] == ["delta_norm", "lens_topk"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = [i for line in data.read_text().splitlines() if line.strip() for i in tok.encode(line.strip())]
    assert load_features(tmp_path / "out")["token_id"].tolist() == expected
    # Same command again: nothing to do. Other settings: a clear error, exit code 1.
    assert main(["collect", *common, "--out", str(tmp_path / "out")]) == 0
    assert main(["collect", *common, "--out", str(tmp_path / "out"), "--subsample", "0.5"]) == 1
    assert "other settings" in capsys.readouterr().err
    assert main(["collect", *common, "--out", str(tmp_path / "o2"), "--features", "deltas"]) == 1
    assert "unknown feature" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_resume_loses_and_duplicates_nothing(tmp_path):
    model_dir = save_model_dir(tmp_path / "model")
    data = write_corpus(tmp_path / "corpus.txt", repeat=60)
    common = ["--model", str(model_dir), "--data", str(data), "--context", "8", "--batch-size", "2",
              "--shard-tokens", "30", "--features", "delta,lens_topk", "--no-progress"]  # fmt: skip
    src = str(Path(__file__).parents[1] / "src")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(_cli(*common, "--out", str(tmp_path / "ref")), check=True, env=env, capture_output=True)
    reference = Manifest.load(tmp_path / "ref")
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    kill_after = rng.randint(1, len(reference.shards) - 2)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(*common, "--out", str(run_dir)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(run_dir.glob("shard-*.safetensors"))) < kill_after and proc.poll() is None:
        assert time.monotonic() < deadline, "the collection did not start"
        time.sleep(0.005)
    time.sleep(rng.uniform(0.0, 0.05))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "manifest.json").exists(), f"the run finished before the kill (after {kill_after} shards)"
    subprocess.run(_cli(*common, "--out", str(run_dir)), check=True, env=env, capture_output=True)
    resumed = Manifest.load(run_dir)
    assert resumed.window_ids() == reference.window_ids()
    assert [s["sha256"] for s in resumed.shards] == [s["sha256"] for s in reference.shards]
    a, b = load_features(reference), load_features(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key
