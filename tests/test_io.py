"""deltaexit.io: atomic writes leave files with the umask's normal permissions (issue 16, item 7)."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest

from deltaexit.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    current_umask,
    normalize_permissions,
)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_current_umask_reads_without_changing(umask_022):
    assert current_umask() == 0o022
    assert current_umask() == 0o022


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write_bytes(p, b"x"),
        lambda p: atomic_write_text(p, "x"),
        lambda p: atomic_write_json(p, {"a": 1}),
    ],
    ids=["bytes", "text", "json"],
)
def test_atomic_writes_get_umask_permissions(tmp_path, umask_022, write):
    target = tmp_path / "out"
    write(target)
    assert mode(target) == 0o644


def test_atomic_path_replacing_a_file_gets_umask_permissions(tmp_path, umask_022):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary left behind


def test_atomic_path_failure_leaves_old_file(tmp_path, umask_022):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_normalize_permissions_fixes_private_files_and_folders(tmp_path, umask_022):
    folder = tmp_path / "model"
    folder.mkdir()
    fd, name = tempfile.mkstemp(dir=folder)  # 0600, like save_pretrained's model.safetensors
    os.close(fd)
    sub = tempfile.mkdtemp(dir=folder)  # 0700
    (folder / "config.json").write_text("{}")
    assert mode(name) == 0o600 and mode(sub) == 0o700
    normalize_permissions(folder)
    assert mode(name) == 0o644
    assert mode(sub) == 0o755
    assert mode(folder / "config.json") == 0o644
    assert mode(folder) == 0o755


def test_normalize_permissions_after_save_pretrained(tmp_path, umask_022):
    from deltaexit.testing import tiny_model

    out = tmp_path / "saved"
    tiny_model("llama").save_pretrained(out)
    normalize_permissions(out)
    assert {p.name: mode(p) for p in out.iterdir()} == {p.name: 0o644 for p in out.iterdir()}
