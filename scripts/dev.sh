#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip, no torch):
#   bash scripts/dev.sh demo   -> set up .venv if needed, then run the demo
#   bash scripts/dev.sh test   -> set up .venv if needed, then run the test suite
# torch is pinned to the CPU wheel first, so the permissive `torch>=2.2` in
# pyproject.toml never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${DELTAEXIT_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==2.13.0"
fi
if [ ! -f "$VENV/.deltaexit-installed" ] || [ pyproject.toml -nt "$VENV/.deltaexit-installed" ]; then
    "$VENV/bin/pip" install -q -e ".[test,plot,dev]"
    touch "$VENV/.deltaexit-installed"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/deltaexit" demo "$@" ;;
    test) exec "$VENV/bin/python" -m pytest -q "$@" ;;
    *) exec "$VENV/bin/deltaexit" "$cmd" "$@" ;;
esac
