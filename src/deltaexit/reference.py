"""The reference models embedded in the package (no network): ``load_reference("v1")``.

- ``v1``: Llama shape of the research note (hidden 64, 4 heads, FFN 256, 8 layers, byte-level BPE
  vocabulary 4096), trained plainly on WikiText-2 ``valid.txt`` with ``deltaexit train --preset ref64-plain``.
- ``v2``: the same shape, tokenizer, data, seed and step count trained with the LayerSkip recipe
  (layer dropout + early-exit loss, ``deltaexit train --preset ref64-layerskip``).
- ``v3``: the proportions of real checkpoints (hidden 256, 8 heads, FFN 1024, 12 layers, the same tokenizer:
  the LM head costs about one block), trained with the LayerSkip recipe (``deltaexit train --preset
  ref256-layerskip``), stored in bfloat16 and upcast to float32 at load. The model early exit is measured on.

Each is a normal HF directory: ``AutoModelForCausalLM.from_pretrained(reference_path("v1"))`` works too.

Example:
    >>> model, tokenizer = load_reference("v1")
    >>> model.config.num_hidden_layers
    8
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["available_references", "build_preset", "default_cache_dir", "load_reference", "model_dir", "reference_path"]

_ASSETS = Path(__file__).resolve().parent / "assets"


def available_references() -> list[str]:
    """Names of the reference models shipped with this installation (e.g. ``["v1", "v2"]``)."""
    if not _ASSETS.is_dir():
        return []
    names = []
    for entry in sorted(_ASSETS.iterdir()):
        if entry.name.startswith("reference-") and (entry / "config.json").is_file():
            names.append(entry.name[len("reference-") :])
    return names


def model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """A model directory from a shipped reference name (``"v1"``, ``"v2"``) or a path, for the CLI's ``--model``.

    Example:
        >>> model_dir("v1") == reference_path("v1")
        True
    """
    if str(name_or_path) in available_references() and not Path(name_or_path).is_dir():
        return reference_path(str(name_or_path))
    return Path(name_or_path)


def reference_path(name: str = "v1") -> Path:
    """Directory of the embedded reference model ``name``.

    Raises:
        ValueError: ``name`` is not shipped (the message lists the ones that are).
    """
    path = _ASSETS / f"reference-{name}"
    if not (path / "config.json").is_file():
        raise ValueError(
            f"no embedded reference model {name!r}; available: {available_references() or 'none'} "
            "(build others with `deltaexit train --preset ...`)"
        )
    return path


def load_reference(name: str = "v1") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load an embedded reference model and its tokenizer, in fp32 eval mode.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` and a fast tokenizer (bos/eos/pad set).

    Example:
        >>> model, tokenizer = load_reference()
        >>> ids = tokenizer("The game began", return_tensors="pt").input_ids
        >>> model(input_ids=ids).logits.shape[-1]
        4096
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reference_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tokenizer


def default_cache_dir() -> Path:
    """``$DELTAEXIT_CACHE`` or ``~/.cache/deltaexit``: where :func:`build_preset` keeps trained models."""
    return Path(os.environ.get("DELTAEXIT_CACHE", Path.home() / ".cache" / "deltaexit"))


def build_preset(
    preset: str,
    cache_dir: str | os.PathLike[str] | None = None,
    data: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Path:
    """Directory of the model trained with ``deltaexit train --preset PRESET``; trains it if missing.

    Models too large to ship (``ref256-plain``, ``ref256-layerskip``) are built once into
    ``cache_dir/PRESET`` (default :func:`default_cache_dir`) and reused afterwards.

    Args:
        preset: A name from :data:`deltaexit.training.PRESETS`.
        cache_dir: Where the models live.
        data: Training text (WikiText-2 ``valid.txt``; see ``docs/reference-models.md``); needed only to train.
        progress: tqdm bars while training.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> cache = Path(tempfile.mkdtemp())
        >>> (cache / "ref256-plain").mkdir()
        >>> _ = (cache / "ref256-plain" / "config.json").write_text("{}")   # as if built before
        >>> build_preset("ref256-plain", cache_dir=cache) == cache / "ref256-plain"
        True
    """
    from deltaexit.threads import torch_threads
    from deltaexit.training.build import train_reference
    from deltaexit.training.model_config import PRESETS
    from deltaexit.training.recipes import get_recipe
    from deltaexit.training.trainer import TrainConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {sorted(PRESETS)}")
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = out / preset
    if (out / "config.json").is_file():
        return out
    if data is None:
        raise FileNotFoundError(
            f"preset {preset!r} is not built yet: pass data=PATH to WikiText-2 valid.txt to train it "
            "(see docs/reference-models.md for where to get it)"
        )
    data = Path(data)
    if not data.is_file():
        raise FileNotFoundError(f"training data {str(data)!r} not found: pass data=PATH to valid.txt")
    s = PRESETS[preset]
    train = TrainConfig(
        steps=s["steps"],
        batch_size=s["batch_size"],
        lr=s["lr"],
        warmup=s.get("warmup", 30),
        threads=s.get("threads", 1),
    )
    shape = {k: s[k] for k in ("vocab", "hidden", "heads", "ffn", "layers", "context")}
    with torch_threads(train.threads):  # the library never sets threads itself; the preset's count makes it exact
        train_reference(
            data,
            out,
            train=train,
            recipe=get_recipe(s["recipe"]),
            eval_data=None,
            progress=progress,
            save_dtype=s.get("save_dtype", "float32"),
            arch=s.get("arch", "llama"),
            **shape,
        )
    return out
