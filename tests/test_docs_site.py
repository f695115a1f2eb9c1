"""The documentation site builds with ``mkdocs build --strict`` (no broken link, anchor or docstring)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
           if importlib.util.find_spec(m.split(".")[0]) is None or importlib.util.find_spec(m) is None]  # fmt: skip


def test_every_docs_page_is_in_the_nav():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert pages and [p for p in pages if f" {p}" not in config] == []


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"docs tools not installed ({MISSING}): pip install -e '.[docs]'")
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "examples" / "index.html").is_file()
    api = (site / "api-generation" / "index.html").read_text(encoding="utf-8")
    assert 'id="deltaexit.generation.EarlyExit"' in api  # the reference is generated from the docstrings
    assert "load_reference" in (site / "examples" / "index.html").read_text(encoding="utf-8")  # scripts included
