"""Corpus-level scores: WER and CER with jiwer, BLEU and chrF with sacrebleu.

All functions are pure: they take parallel lists of references and hypotheses (same length,
same order) and return one float for the whole corpus.

* WER/CER are *fractions* (0.25 = 25 %), not percentages, and can exceed 1 when the
  hypotheses hold many insertions. They are computed after :func:`normalize` when a language
  is given, otherwise on the strings exactly as passed.
* BLEU and chrF are on sacrebleu's 0-100 scale, computed on the raw (detokenised) text with
  sacrebleu's defaults: BLEU with the ``13a`` tokeniser, exponential smoothing and case
  sensitivity; chrF with character order 6, word order 0 and beta 2 (chrF, not chrF++).
"""

from __future__ import annotations

from typing import Sequence

import jiwer
import sacrebleu

from .normalize import normalize


def _check_pairs(refs: Sequence[str], hyps: Sequence[str]) -> None:
    """Raise ValueError unless ``refs`` and ``hyps`` are equally long, non-empty string lists."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses; pass one each")
    if not refs:
        raise ValueError("no references given; a corpus score needs at least one pair")
    for text in (*refs, *hyps):
        if not isinstance(text, str):
            raise ValueError(f"references and hypotheses must be strings, got {type(text).__name__}")


def _normalized(texts: Sequence[str], language: str | None) -> list[str]:
    """``texts`` normalised for ``language``, or with only whitespace collapsed if None."""
    if language is None:
        return [" ".join(text.split()) for text in texts]
    return [normalize(text, language) for text in texts]


def _error_rate(output, what: str) -> float:
    """(S + D + I) / N from a jiwer alignment, where N = S + D + hits = reference length."""
    errors = output.substitutions + output.deletions + output.insertions
    length = output.substitutions + output.deletions + output.hits
    if length == 0:
        if errors == 0:
            return 0.0
        raise ValueError(f"every reference is empty after normalisation, so the {what} of "
                         "non-empty hypotheses is undefined")
    return errors / length


def wer(refs: Sequence[str], hyps: Sequence[str], language: str | None = None) -> float:
    """Corpus word error rate: total word edits over total reference words.

    Words are whitespace-separated tokens of the (normalised, if ``language`` is given)
    texts; each pair is aligned on its own and the substitutions, deletions and insertions
    of all pairs are summed, then divided by the summed reference word counts. A reference
    that is empty contributes its hypothesis's words as insertions and nothing to the
    denominator. If all references are empty the result is 0.0 when all hypotheses are
    empty too, otherwise ValueError (the rate is undefined).
    """
    _check_pairs(refs, hyps)
    output = jiwer.process_words(_normalized(refs, language), _normalized(hyps, language))
    return _error_rate(output, "WER")


def cer(refs: Sequence[str], hyps: Sequence[str], language: str | None = None) -> float:
    """Corpus character error rate: total character edits over total reference characters.

    Same as :func:`wer` but on characters of the (normalised) texts, with the single spaces
    between words counted as characters; leading/trailing whitespace is not counted.
    """
    _check_pairs(refs, hyps)
    output = jiwer.process_characters(_normalized(refs, language), _normalized(hyps, language))
    return _error_rate(output, "CER")


def bleu(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of ``hyps`` against one reference each, sacrebleu defaults.

    Identical non-empty texts score 100; a hypothesis list of empty strings scores 0.
    """
    _check_pairs(refs, hyps)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus chrF (0-100) of ``hyps`` against one reference each, sacrebleu defaults.

    Character n-gram (1-6) F-score with recall weighted twice as much as precision
    (beta = 2); whitespace is ignored. Identical texts score 100, no shared characters 0.
    """
    _check_pairs(refs, hyps)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)
