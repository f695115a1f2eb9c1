"""The command-line tool: demo and support-matrix run end to end."""

from __future__ import annotations

import pytest

from deltaexit.cli import main


def test_demo_runs_end_to_end(capsys):
    assert main(["demo", "--tokens", "512", "--new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "oracle" in out and "AUROC" in out
    # verify is lossless: its agreement with model.generate must print as exactly 1.000.
    verify_row = next(line for line in out.splitlines() if line.strip().startswith("verify"))
    assert verify_row.split()[3] == "1.000"
    assert "identical output: True" in out  # self-speculation on v2 keeps model.generate's tokens


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
