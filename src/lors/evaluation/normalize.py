"""Text normalisation before WER/CER scoring, following Whisper's evaluation recipe.

English text goes through Whisper's :class:`EnglishTextNormalizer` (lower case, no
punctuation, numbers written as digits, contractions and a few spellings standardised),
every other language through :class:`BasicTextNormalizer` (lower case, bracketed spans and
punctuation/symbols replaced by spaces, whitespace collapsed; diacritics are kept because
they distinguish words in the languages lors evaluates). Both come from
``transformers.models.whisper.english_normalizer``.

Whisper's English normaliser also maps British to American spellings through the
``normalizer.json`` table shipped with OpenAI's tokenizer. The Whisper base that lors embeds
has no such file, so the mapping is empty unless one is passed to
:func:`english_normalizer`: ``colour`` and ``color`` then stay different words.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable

from transformers.models.whisper.english_normalizer import (
    BasicTextNormalizer,
    EnglishTextNormalizer,
)

from ..errors import LorsError

ENGLISH = "en"


@functools.lru_cache(maxsize=None)
def english_normalizer(spelling_file: str | None = None) -> Callable[[str], str]:
    """Whisper's English normaliser; ``spelling_file`` is an optional ``normalizer.json``.

    The file maps spellings to their standard form (``{"colour": "color", ...}``); without it
    the spelling mapping is empty. Cached per file, so repeated calls are free.
    """
    mapping: dict[str, str] = {}
    if spelling_file is not None:
        try:
            mapping = json.loads(Path(spelling_file).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LorsError(f"cannot read English spelling mapping {spelling_file}: {exc}; "
                            "pass a JSON object of word -> standard spelling") from exc
        if not isinstance(mapping, dict):
            raise LorsError(f"English spelling mapping {spelling_file} must be a JSON object")
    return EnglishTextNormalizer(mapping)


@functools.lru_cache(maxsize=None)
def basic_normalizer() -> Callable[[str], str]:
    """Whisper's language-independent normaliser (diacritics kept, letters not split)."""
    return BasicTextNormalizer(remove_diacritics=False, split_letters=False)


def normalize(text: str, language: str) -> str:
    """Normalise ``text`` written in ``language`` (an ISO 639-1 code) for WER/CER.

    ``language == "en"`` uses :func:`english_normalizer`, any other code
    :func:`basic_normalizer`. The result has no leading/trailing whitespace and single spaces
    between words; it may be empty (e.g. for a text of punctuation only).
    """
    normalizer = english_normalizer() if language == ENGLISH else basic_normalizer()
    return " ".join(normalizer(text).split())
