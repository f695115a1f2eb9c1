"""Every script in examples/ runs offline with ``--quick`` and prints what its docstring promises."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SRC = Path(__file__).resolve().parents[1] / "src"

#: script -> strings its --quick output must contain
EXPECTED = {
    "01_saturation_table.py": ["oracle: mean saturation layer", "compute saved"],
    "02_compare_measures.py": ["softmax-gap", "delta-mlp", "best AUROC"],
    "03_generate_kv_policies.py": ["verify", "propagate", "recompute", "1.000"],
    "04_calibrate_threshold.py": ["constant threshold", "held-out"],
    "05_train_layerskip.py": ["per-layer perplexity", "layerskip"],
    "06_stream_and_fit.py": ["shards", "resumed", "test AUROC"],
}


def test_every_example_is_tested_and_documented():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED)
    for name in scripts:
        doc = ast.get_docstring(ast.parse((EXAMPLES / name).read_text(encoding="utf-8")))
        assert doc and "Run:" in doc and f"examples/{name}" in doc, name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--quick"],
        cwd=tmp_path,  # nothing may depend on the working directory
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for expected in EXPECTED[name]:
        assert expected in proc.stdout, (expected, proc.stdout[-2000:])
