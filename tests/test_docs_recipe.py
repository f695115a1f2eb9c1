"""The recipe of ``docs/scale-out.md`` (collect -> fit -> analyze -> calibrate -> generate) runs as written.

The blocks between ``<!-- recipe:start -->`` and ``<!-- recipe:end -->`` run in order in one directory: ``bash``
blocks through the CLI's ``main`` (each a ``deltaexit`` command), ``python`` blocks in one namespace. The only
changes: ``MODEL`` becomes a tiny random model's directory, and the token counts, epochs and context shrink
(:data:`SMALLER`) so that the test stays fast.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from _tiny_lm import tiny_model_dir, tiny_text
from deltaexit.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALLER = {
    "--tokens 200000": "--tokens 3000",
    "--tokens 50000": "--tokens 800",
    "--context 128": "--context 32",
    "--shard-tokens 16384": "--shard-tokens 256",
    "max_epochs=10": "max_epochs=2",
    "batch_size=4096": "batch_size=512",
}


def recipe_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "docs" / "scale-out.md").read_text(encoding="utf-8")
    section = text.split("<!-- recipe:start -->")[1].split("<!-- recipe:end -->")[0]
    return re.findall(r"```(bash|python)\n(.*?)```", section, flags=re.S)


def test_the_recipe_has_every_step():
    blocks = recipe_blocks()
    commands = [shlex.split(code.replace("\\\n", " "))[:2] for lang, code in blocks if lang == "bash"]
    assert commands == [["deltaexit", "collect"], ["deltaexit", "analyze"], ["deltaexit", "generate"]]
    python = "".join(code for lang, code in blocks if lang == "python")
    assert ".fit(dataset)" in python and "dx.calibrate(shards=" in python
    for old in SMALLER:
        assert old in "".join(code for _, code in blocks), f"{old!r} is no longer in the recipe: update SMALLER"


def test_the_scale_out_recipe_runs_as_written(tmp_path, monkeypatch, capsys):
    model_dir = tiny_model_dir(tmp_path / "model", num_layers=4, hidden=32)
    (tmp_path / "valid.txt").write_text(tiny_text(300), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for lang, code in recipe_blocks():
        for old, new in SMALLER.items():
            code = code.replace(old, new)
        code = code.replace("MODEL", str(model_dir))
        if lang == "bash":
            argv = shlex.split(code.replace("\\\n", " "))
            assert argv[0] == "deltaexit" and main(argv[1:]) == 0, code
        else:
            exec(compile(code, "docs/scale-out.md", "exec"), namespace)
    printed = capsys.readouterr().out
    result = json.loads(Path("analyze.json").read_text())
    assert set(result["labels"]) == {"next", "final"}
    assert {"delta-norm", "softmax-max", "delta-mlp"} <= set(result["labels"]["next"]["summary"])
    assert Path("measures/delta-mlp").is_dir() and namespace["result"].n > 0
    assert "The history of the city" in printed  # the generated text follows the prompt
