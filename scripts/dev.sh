#!/usr/bin/env bash
# One entry point for a fresh machine (Python 3.11, pip, no torch):
#   bash scripts/dev.sh demo   -> set up .venv if needed, then run the demo
#   bash scripts/dev.sh test   -> set up .venv if needed, then the checks CI runs: ruff check, ruff format
#                                 --check, mypy (config in pyproject.toml), then pytest: tests/ and the doctests
#                                 of src/deltaexit (pyproject's testpaths/addopts); arguments go to pytest
#   bash scripts/dev.sh lint   -> only ruff and mypy
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
    "$VENV/bin/pip" install -q -e ".[test,plot,dev,docs]"
    touch "$VENV/.deltaexit-installed"
fi
# ruff check, ruff format --check and mypy; prints one line per failed check and returns how many failed.
lint() {
    local failed=0
    "$VENV/bin/ruff" check . || { echo "lint: ruff check failed"; failed=$((failed + 1)); }
    "$VENV/bin/ruff" format --check . || { echo "lint: ruff format --check failed (run: ruff format .)"; failed=$((failed + 1)); }
    "$VENV/bin/mypy" || { echo "lint: mypy failed"; failed=$((failed + 1)); }
    return "$failed"
}
cmd=${1:-demo}
shift || true
case "$cmd" in
    demo) exec "$VENV/bin/deltaexit" demo "$@" ;;
    lint) lint ;;
    test)
        # Every check runs even when an earlier one fails; pytest runs last so its closing line ends the output.
        lint_status=0
        lint || lint_status=$?
        test_status=0
        "$VENV/bin/python" -m pytest -q "$@" || test_status=$?
        if [ "$test_status" -ne 0 ]; then exit "$test_status"; fi
        exit $((lint_status > 0 ? 1 : 0))
        ;;
    *) exec "$VENV/bin/deltaexit" "$cmd" "$@" ;;
esac
