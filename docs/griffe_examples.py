"""Griffe extension for the API reference: read ``Example:`` sections as ``Examples:``.

deltaexit's Google-style docstrings title their doctests ``Example:``; Griffe only parses
``Examples:`` into code blocks (``Example:`` would become an admonition of plain Markdown, and the
``>>>`` lines would run together). Loaded by ``mkdocs.yml``; the source docstrings stay as they are.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExamplesSection(griffe.Extension):
    """Rename every ``Example:`` section title to ``Examples:`` before the docstring is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
