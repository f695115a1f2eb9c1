"""Bad model directories given to the model-taking commands: one-line errors naming the file (issue 16, item 8)."""

from __future__ import annotations

import shutil

import pytest
import torch

from deltaexit.cli import main
from deltaexit.reference import reference_path
from deltaexit.samples import sample_text


@pytest.fixture()
def broken(tmp_path):
    def make(kind: str):
        path = tmp_path / kind
        shutil.copytree(reference_path("v1"), path)
        if kind == "pickle":
            torch.save({"weight": torch.zeros(2)}, path / "model.safetensors")
        elif kind == "truncated":
            data = (path / "model.safetensors").read_bytes()
            (path / "model.safetensors").write_bytes(data[: len(data) // 3])
        else:
            (path / "config.json").write_text("{not json")
        return path

    return make


def _argv(command: str, model: str, tmp_path) -> list[str]:
    text = tmp_path / "t.txt"
    text.write_text(sample_text())
    if command == "generate":
        return ["generate", "--model", model, "--prompt", "The", "--max-new-tokens", "2"]
    if command == "analyze":
        return ["analyze", "--model", model, "--data", str(text), "--tokens", "256", "--quiet"]
    return ["collect", "--model", model, "--data", str(text), "--out", str(tmp_path / "feats"), "--no-progress"]


@pytest.mark.parametrize("command", ["generate", "analyze", "collect"])
@pytest.mark.parametrize("kind", ["pickle", "truncated", "config"])
def test_a_bad_model_directory_is_one_clear_line(broken, tmp_path, capsys, command, kind):
    path = broken(kind)
    assert main(_argv(command, str(path), tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"deltaexit {command}: error: ")
    named = "config.json" if kind == "config" else "model.safetensors"
    assert str(path / named) in err
    assert "save_pretrained" in err


@pytest.mark.parametrize("command", ["analyze", "collect"])
def test_analyze_and_collect_take_reference_names(tmp_path, capsys, command):
    """Item 10: --model v1 names the shipped reference (as generate and demo do)."""
    argv = _argv(command, "v1", tmp_path)
    if command == "analyze":
        argv += ["--measures", "delta-norm", "--window", "32"]
    else:
        argv += ["--features", "delta_norm", "--context", "32"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(_argv(command, "no-such-model", tmp_path)) == 1
    err = capsys.readouterr().err
    assert "not found" in err and "shipped reference (" in err and "v1" in err
