"""The English text sample shipped with the package, so that examples and defaults run offline.

The sample is the last paragraphs (about 5,200 words) of the WikiText-2 test split (Merity et al.,
2016; CC BY-SA 3.0, attribution in ``assets/sample/README.md``), in WikiText's tokenized form
(`` , `` spacing, ``<unk>``, `` = Heading = `` lines). It lies outside the 65,536 test tokens the
reproduction evaluates on. It is a sample for demos, not a benchmark: for real figures use the full
WikiText-2 (the HuggingFace dataset ``Salesforce/wikitext``, config ``wikitext-2-raw-v1``, or the
original release), downloaded yourself, one paragraph a line.

Example:
    >>> from deltaexit.samples import sample_paragraphs, sample_path, sample_prompts, sample_text
    >>> sample_path().name
    'wikitext-2-test-tail.txt'
    >>> len(sample_text().split()) > 5000
    True
    >>> len(sample_paragraphs()) > 40
    True
    >>> sample_prompts(2, words=4)
    ['Before long , <unk>', "'s expenses strained the"]
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SAMPLE_FILE", "sample_paragraphs", "sample_path", "sample_prompts", "sample_text"]

#: File name of the shipped sample inside ``deltaexit/assets/sample/``.
SAMPLE_FILE = "wikitext-2-test-tail.txt"


def sample_path() -> Path:
    """Path of the shipped text file (UTF-8, one paragraph a line), e.g. for ``--data``."""
    path = Path(__file__).resolve().parent / "assets" / "sample" / SAMPLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the shipped text sample {str(path)!r} is missing: reinstall deltaexit")
    return path


def sample_text() -> str:
    """The whole sample as one string (paragraphs separated by newlines)."""
    return sample_path().read_text(encoding="utf-8")


def sample_paragraphs(min_words: int = 1) -> list[str]:
    """The sample's paragraphs (stripped, headings included) with at least ``min_words`` words."""
    lines = (line.strip() for line in sample_text().splitlines())
    return [p for p in lines if p and len(p.split()) >= min_words]


def sample_prompts(num: int | None = None, words: int = 12) -> list[str]:
    """Prompts of ``words`` words each: consecutive, non-overlapping pieces of the body paragraphs.

    Headings are skipped and no prompt spans two paragraphs. Useful as calibration prompts.

    Args:
        num: How many (default: every piece the sample holds).
        words: Words per prompt.

    Raises:
        ValueError: ``words < 1``, or ``num`` exceeds what the sample holds (the message says how many).
    """
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    prompts: list[str] = []
    for paragraph in sample_paragraphs(min_words=words):
        if paragraph.startswith("="):
            continue
        tokens = paragraph.split()
        prompts.extend(" ".join(tokens[i : i + words]) for i in range(0, len(tokens) - words + 1, words))
    if num is not None:
        if num > len(prompts):
            raise ValueError(f"the sample holds {len(prompts)} prompts of {words} words; asked for {num}")
        prompts = prompts[:num]
    return prompts
