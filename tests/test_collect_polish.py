"""Collect resume messages, the progress bar's total, settings diffs, missing collections, the support
matrix's progress and header (issue 16, item 14)."""

from __future__ import annotations

import re

import pytest
import torch

from deltaexit.cli import main
from deltaexit.streaming import Manifest, ManifestError, ShardDataset, collect_to_disk
from deltaexit.testing import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Crash(RuntimeError):
    pass


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=2, hidden=32, vocab=128, seed=0)


def _docs() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (30,), generator=g).tolist() for _ in range(8)]


def _run(model, out, **kw):
    kw = {"features": "delta_norm", "context": 16, "batch_size": 2, "shard_tokens": 30, "progress": False, **kw}
    return collect_to_disk(model, _docs(), out, **kw)


def _last_bar(err: str) -> str:
    return re.split(r"[\r\n]", err.strip())[-1]


def test_resume_says_what_it_keeps_and_the_bar_reaches_its_total(model, tmp_path, capsys):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1
        if calls["n"] == 5:
            raise Crash

    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(Crash):
            _run(model, tmp_path / "o", max_tokens=200)
    finally:
        handle.remove()
    kept = Manifest.read(tmp_path / "o" / "manifest.rank00000.json")
    assert kept.shards and not kept.complete
    capsys.readouterr()
    _run(model, tmp_path / "o", max_tokens=200, progress=True)
    err = capsys.readouterr().err
    assert f"resuming in {tmp_path / 'o'}: {len(kept.shards)} shards ({kept.num_tokens} tokens)" in err
    assert "continuing from batch" in err
    assert "(resumed)" in err and "200/200" in _last_bar(err)

    _run(model, tmp_path / "o", max_tokens=200, progress=True)
    assert "already holds this collection" in capsys.readouterr().err


def test_the_bar_ends_full_when_the_corpus_ends_before_the_budget(model, tmp_path, capsys):
    _run(model, tmp_path / "o", max_tokens=10_000, progress=True)
    assert "240/240" in _last_bar(capsys.readouterr().err)  # 8 documents of 30 tokens


def test_a_settings_mismatch_shows_old_and_new_values(model, tmp_path):
    _run(model, tmp_path / "o")
    with pytest.raises(ManifestError, match=r"subsample: 1\.0 -> 0\.5"):
        _run(model, tmp_path / "o", subsample=0.5)
    with pytest.raises(ManifestError, match=r"model\.fingerprint: '[0-9a-f]+' -> '[0-9a-f]+'"):
        _run(tiny_model("llama", num_layers=2, hidden=32, vocab=128, seed=1), tmp_path / "o")


def test_a_missing_or_foreign_directory_is_named_as_such(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ShardDataset(tmp_path / "nonexistent_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a collection"):
        ShardDataset(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.rank00000.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="did not finish"):
        ShardDataset(tmp_path / "empty")


def test_support_matrix_shows_progress_and_names_its_real_output(tmp_path, capsys, monkeypatch):
    import deltaexit.support as support

    monkeypatch.setattr(support, "check_architecture", lambda t: {"model_type": t, "collect": "ok"})
    out = tmp_path / "matrix.md"
    assert main(["support-matrix", "--out", str(out)]) == 0
    assert f"`deltaexit support-matrix --out {out}`" in out.read_text()
    assert "support matrix" in capsys.readouterr().err  # the tqdm bar
    assert main(["support-matrix", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "Measured with `deltaexit support-matrix` on" in captured.out and "support matrix" not in captured.err
