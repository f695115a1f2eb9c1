"""`deltaexit generate` output and help (issue 16, item 13): colour legend, NO_COLOR, non-tty, defaults shown."""

from __future__ import annotations

import argparse
import io

import pytest

from deltaexit.cli import build_parser, main
from deltaexit.commands.generate import colour_legend, use_colour


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "expected"),
    [
        (_Tty(), {}, True),
        (_Tty(), {"NO_COLOR": "1"}, False),
        (_Tty(), {"NO_COLOR": ""}, True),  # no-color.org: set and non-empty
        (io.StringIO(), {}, False),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(stream, env, expected):
    assert use_colour(stream, env) is expected


def test_the_legend_names_every_layer_in_its_colour():
    legend = colour_legend(4)
    assert legend.count("\033[0m") == 4 and "(of 4; green = early, red = full depth)" in legend


def test_coloured_output_has_a_legend_and_no_color_turns_it_off(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdout", _Tty())
    argv = ["generate", "--model", "v1", "--prompt", "The", "--max-new-tokens", "3", "--threshold", "inf"]
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert main(argv) == 0
    import sys

    out = sys.stdout.getvalue()
    assert out.startswith("exit layer: ") and "\033[" in out
    monkeypatch.setattr("sys.stdout", _Tty())
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(argv) == 0
    out = sys.stdout.getvalue()
    assert "\033[" not in out and "[8]" in out and "exit layer:" not in out


def test_generate_help_has_a_description_and_every_option_help_and_default():
    parser = build_parser(commands=("generate",))
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = action.choices["generate"]
    assert sub.description and "NO_COLOR" in sub.description
    text = sub.format_help()
    for option in sub._actions:
        if option.dest == "help":
            continue
        assert option.help, option.dest
        if not option.required and option.default not in (None, False):
            assert f"(default: {option.default})" in " ".join(text.split()), option.dest
