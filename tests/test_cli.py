"""The command-line tool: demo and support-matrix run end to end."""

from __future__ import annotations

import pytest

from deltaexit.cli import main


def test_demo_runs_end_to_end(capsys, tmp_path):
    import json

    path = tmp_path / "demo.json"
    argv = ["demo", "--model", "v2", "--tokens", "512", "--prompts", "2", "--new-tokens", "4", "--repeats", "2"]
    assert main([*argv, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "AUROC" in out
    record = json.loads(path.read_text())
    assert record["model"] == "v2" and record["repeats"] == 2
    rows = {row["row"]: row for row in record["rows"]}
    assert list(rows)[:3] == ["model.generate", "assistant_early_exit", "prompt_lookup"]
    assert len(rows) == 5
    for row in rows.values():
        if "error" in row:
            assert row["error"] in out
            continue
        speed = row["speed"]
        assert set(speed) == {"median", "min", "max", "iqr", "repeats"} and speed["repeats"] == 2
        assert speed["min"] <= speed["median"] <= speed["max"]
        assert f"{speed['median']:.2f}x ({speed['min']:.2f}-{speed['max']:.2f})" in out
        if speed["median"] < 0.97:  # every slow row is explained
            assert f"{row['row']} at {speed['median']:.2f}x:" in out
    # verify is lossless: output identical to model.generate's, agreement printed as exactly 1.000.
    verify = rows["dx verify (lossless)"]
    assert verify["identical"] and verify["agreement"] == 1.0
    verify_line = next(line for line in out.splitlines() if line.strip().startswith("dx verify (lossless)"))
    assert " 1.000 " in verify_line


def test_support_matrix_writes_markdown(tmp_path, monkeypatch):
    import deltaexit.support as support

    monkeypatch.setattr(support, "ARCHITECTURES", ("llama",))
    monkeypatch.setattr(support.support_matrix_markdown, "__defaults__", (("llama",),))
    out = tmp_path / "matrix.md"
    assert main(["support-matrix", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| llama |" in text and "transformers" in text


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert "deltaexit" in capsys.readouterr().out


def _run_python(code: str) -> str:
    """Run ``code`` in a fresh interpreter with this checkout's src/ first; return its stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout


def test_import_deltaexit_is_lazy():
    """Issue 16 item 17: the facade imports nothing heavy until a name is used."""
    out = _run_python(
        "import sys, deltaexit\n"
        "heavy = [m for m in ('torch', 'transformers', 'transformers.generation', 'accelerate') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    assert out.strip() == "[]"


def test_help_imports_no_torch():
    out = _run_python(
        "import sys, contextlib, io\n"
        "from deltaexit.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as buf:\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('support-matrix' in buf.getvalue(), 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    assert out.split() == ["True", "False", "False"]


def test_every_public_name_resolves():
    import deltaexit as dx

    missing = [name for name in dx.__all__ if getattr(dx, name, None) is None]
    assert missing == []
    assert set(dx.__all__) <= set(dir(dx))
    assert callable(dx.saturation) and callable(dx.collect)  # the functions, not same-named submodules
    assert dx.generation.EarlyExit is dx.EarlyExit  # submodules stay reachable as attributes
    for name in ("MeasureFileError", "InsufficientCalibrationData", "CalibrationFileError"):
        assert issubclass(getattr(dx, name), Exception)


def test_unknown_attribute_is_an_attribute_error():
    import deltaexit as dx

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = dx.nope


def test_stub_help_matches_each_command_module():
    """cli.COMMANDS repeats each module's one-line help (so --help needs no import); keep them equal."""
    import argparse

    from deltaexit.cli import COMMANDS, build_parser

    full = build_parser()
    stubs = build_parser(commands=())
    for parser in (full, stubs):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        helps = {choice.dest: choice.help for choice in action._choices_actions}
        assert helps == {name: help_text for name, (_, help_text) in COMMANDS.items()}


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
