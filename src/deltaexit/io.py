"""Atomic file writes: write to a temporary file beside the target, then rename.

A reader never sees a half-written file, and an interrupted write leaves the old
file (or none) in place.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.json")
    >>> atomic_write_text(path, "{}")
    >>> open(path).read()
    '{}'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "current_umask",
    "file_sha256",
    "normalize_permissions",
    "safe_name",
]


def current_umask() -> int:
    """The process's umask, read without changing it where ``/proc`` says it (else set-and-restore at once).

    Example:
        >>> 0 <= current_umask() <= 0o777
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_mode(path: Path) -> int:
    """What ``open()``/``mkdir`` would give ``path`` under the umask (0o666 files, 0o777 directories)."""
    base = 0o777 if path.is_dir() else 0o666
    return base & ~current_umask()


def normalize_permissions(directory: str | os.PathLike[str]) -> None:
    """Give ``directory`` and every file and folder under it the umask's normal permissions.

    Writers that go through a private temporary file (``tempfile.mkstemp``, ``transformers``'
    ``save_pretrained`` writing ``model.safetensors``) leave files at ``0600``; call this after them.

    Example:
        >>> import tempfile, os, stat
        >>> folder = tempfile.mkdtemp()
        >>> fd, name = tempfile.mkstemp(dir=folder); os.close(fd)
        >>> normalize_permissions(folder)
        >>> oct(stat.S_IMODE(os.stat(name).st_mode)) == oct(0o666 & ~current_umask())
        True
    """
    root = Path(directory)
    for path in (root, *root.rglob("*")):
        if not path.is_symlink():
            os.chmod(path, _default_mode(path))


@contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On error the temporary file is removed and ``path`` is untouched.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> with atomic_path(path) as tmp:
        ...     _ = tmp.write_bytes(b"...")
        >>> open(path, "rb").read()
        b'...'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; keep the umask's normal mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=default) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> atomic_write_text(path, "")
        >>> file_sha256(path)[:12]
        'e3b0c44298fc'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file name a shell takes unquoted: every run of characters other than ``A-Za-z0-9_.-`` becomes ``_``.

    ``deltaexit analyze --save-measures DIR`` saves measure ``name`` as ``DIR/<label>/<safe_name(name)>``.

    Example:
        >>> safe_name("delta-mlp/per-layer"), safe_name("linear(h)")
        ('delta-mlp_per-layer', 'linear_h_')
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
