"""A tiny random causal LM with a tiny BPE tokenizer, built offline (for analyze tests)."""

from __future__ import annotations

from pathlib import Path

LINES = [
    "the cat sat on the mat and the dog sat on the log .",
    "a bird flew over the river while the sun went down .",
    "numbers like 1 @,@ 000 and 0 @.@ 7 appear in the text .",
    " = Title = ",
    "she wrote a letter to her brother about the long winter .",
    "the old man walked to the market to buy bread and milk .",
]


def tiny_tokenizer(vocab: int = 120):
    """A byte-level BPE tokenizer trained on a few lines, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(LINES * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model_dir(path: Path, *, num_layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny llama and its tokenizer into ``path`` (an HF directory)."""
    from deltaexit.testing import tiny_model

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", num_layers=num_layers, hidden=hidden, vocab=len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_text(lines: int = 200) -> str:
    """A repetitive but varied text of ``lines`` lines."""
    return "\n".join(LINES[i % len(LINES)] + f" {i}" for i in range(lines)) + "\n"


def padded_batch(vocab: int, seed: int = 0):
    """Two random prompts of 8 ids (>= 3), the second left-padded by 3: the support matrix's test batch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids.masked_fill(mask == 0, 0), mask


class CallCounter:
    """Counts the calls of ``modules`` (with ``before``, counted as each call starts, so a call that raises counts
    too); ``close()`` removes the hooks."""

    def __init__(self, modules, *, before: bool = False):
        self.calls = 0
        register = "register_forward_pre_hook" if before else "register_forward_hook"
        self.handles = [getattr(module, register)(self.count) for module in modules]

    def count(self, *_):
        self.calls += 1

    def close(self):
        for h in self.handles:
            h.remove()
