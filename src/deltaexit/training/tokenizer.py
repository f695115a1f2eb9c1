"""Fit a byte-level BPE tokenizer (``tokenizers``) and wrap it as a ``transformers`` fast tokenizer.

The saved directory loads with ``AutoTokenizer.from_pretrained(dir)``; ``bos``, ``eos`` and ``pad``
tokens are set, and since the BPE works on bytes every string round-trips exactly.

Example:
    >>> tok = fit_tokenizer(["a line of text", "another line"], vocab_size=300)
    >>> tok.decode(tok("hello")["input_ids"])
    'hello'
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "fit_tokenizer"]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2


def fit_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Fit a byte-level BPE tokenizer on ``texts`` (one document or paragraph per item).

    Args:
        texts: Training text; an iterable of strings.
        vocab_size: Target vocabulary size including the 256 byte symbols and 3 special tokens.

    Returns:
        A :class:`transformers.PreTrainedTokenizerFast` with ``<pad>``=0, ``<s>``=1, ``</s>``=2.

    Raises:
        ValueError: ``vocab_size`` too small for the byte alphabet, or no text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("cannot fit a tokenizer on empty text: give a file with at least one non-empty line")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
