"""What the model-taking sub-commands share: ``--model`` names and loading with one-line errors.

``--model`` takes a local HF directory or a shipped reference name (:func:`deltaexit.reference.model_dir`).
A directory whose ``config.json`` is not JSON, or whose weights are a pickle or cut short, raises a
:class:`ModelLoadError` naming the file and what to do, which the CLI prints as one line.

Example:
    >>> import tempfile, pathlib
    >>> bad = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (bad / "config.json").write_text("{not json")
    >>> try:
    ...     load_model(model_path(str(bad)))
    ... except ModelLoadError as exc:
    ...     print(str(exc).split(":")[0].endswith("config.json"))
    True
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = [
    "DefaultsHelpFormatter",
    "ModelLoadError",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "model_path",
]


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to each option's help, except required options, flags and None defaults.

    Example:
        >>> parser = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
        >>> _ = parser.add_argument("--tokens", type=int, default=32, help="tokens")
        >>> _ = parser.add_argument("--json", action="store_true", help="print JSON")
        >>> "tokens (default: 32)" in parser.format_help(), "(default: False)" in parser.format_help()
        (True, False)
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unshown = default is None or default is False or default == argparse.SUPPRESS
        if "%(default)" in text or action.required or unshown:
            return text
        return f"{text} (default: %(default)s)"


class ModelLoadError(ValueError):
    """A model directory's config, weights or tokenizer files cannot be read."""


def model_path(name: str | os.PathLike[str]) -> Path:
    """The directory ``--model`` names: a local model directory or a shipped reference name.

    Raises:
        FileNotFoundError: Neither (the message lists the shipped names).

    Example:
        >>> model_path("v1").name
        'reference-v1'
    """
    from deltaexit.reference import available_references, model_dir

    path = model_dir(name)
    if not path.is_dir():
        known = ", ".join(available_references()) or "none"
        raise FileNotFoundError(
            f"--model {str(name)!r} not found: it is neither a local model directory nor a shipped reference ({known})"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a HuggingFace model directory (save_pretrained)")
    return path


def _weight_files(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".pt"))
    return ", ".join(str(path / n) for n in names) or f"the weights in {path}"


def load_model(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(path, **kwargs)`` in eval mode and float32 (unless ``dtype=`` is
    given; a bfloat16 checkpoint such as reference ``v3`` is upcast), with one-line errors.

    Raises:
        ModelLoadError: ``config.json`` is not a valid config, or the weight files are not readable
            safetensors (a pickle renamed, a truncated download); the message names the file.
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    path = Path(path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{path / 'config.json'}: not a valid model config ({first_line(exc)}); "
            "write it again with model.config.save_pretrained(DIR) or re-download the model"
        ) from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), config=config, local_files_only=True, **kwargs)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as exc:
        raise ModelLoadError(
            f"{_weight_files(path)}: cannot load the weights ({first_line(exc)}); save them again with "
            "model.save_pretrained(DIR) (safetensors) or re-download the model"
        ) from None
    return model.eval()


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` with a one-line error saying what to save there.

    Raises:
        ModelLoadError: No usable tokenizer files in ``path``.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelLoadError(
            f"no usable tokenizer in {path} ({first_line(exc)}); save one there with tokenizer.save_pretrained(DIR)"
        ) from None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines).

    Example:
        >>> first_line(ValueError("bad thing\\nmore detail"))
        'bad thing'
    """
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def load_model_and_tokenizer(name: str | os.PathLike[str]) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``--model`` (a directory or a shipped reference name), float32 eval mode,
    with the one-line errors of :func:`model_path`, :func:`load_tokenizer` and :func:`load_model`."""
    path = model_path(name)
    tokenizer = load_tokenizer(path)
    return load_model(path), tokenizer
