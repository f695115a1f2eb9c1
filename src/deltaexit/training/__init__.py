"""Training reference models: tokenizer, data, model shapes, the loop, recipes (plain, LayerSkip), perplexity.

Example:
    >>> from importlib.resources import files
    >>> from deltaexit.threads import torch_threads
    >>> from deltaexit.training import TrainConfig, train_reference
    >>> text = files("deltaexit") / "assets/sample/wikitext-2-test-tail.txt"
    >>> config = TrainConfig(steps=2, batch_size=2, warmup=1)
    >>> with torch_threads(config.threads):  # the caller fixes the thread count
    ...     report = train_reference(text, None, train=config, vocab=300, hidden=16, heads=2, ffn=32, layers=2,
    ...                              context=32, progress=False)
    >>> report["history"]["steps"], report["model"].config.num_hidden_layers
    (2, 2)
"""

from deltaexit.training.build import save_model_dir, train_reference
from deltaexit.training.data import WindowSampler, encode_stream, read_paragraphs
from deltaexit.training.layerskip import BlockTaps, early_exit_loss, exit_loss_weights, layer_dropout_schedule
from deltaexit.training.model_config import PRESETS, reference_config
from deltaexit.training.perplexity import layer_perplexities, perplexity, stream_nll
from deltaexit.training.recipes import LayerSkipRecipe, PlainRecipe, get_recipe
from deltaexit.training.tokenizer import fit_tokenizer
from deltaexit.training.trainer import TrainConfig, train_loop

__all__ = [
    "PRESETS",
    "BlockTaps",
    "LayerSkipRecipe",
    "PlainRecipe",
    "TrainConfig",
    "WindowSampler",
    "early_exit_loss",
    "encode_stream",
    "exit_loss_weights",
    "fit_tokenizer",
    "get_recipe",
    "layer_dropout_schedule",
    "layer_perplexities",
    "perplexity",
    "read_paragraphs",
    "reference_config",
    "save_model_dir",
    "stream_nll",
    "train_loop",
    "train_reference",
]
