"""Bootstrap intervals and paired tests for test-set WER/BLEU and normalised performance.

Everything here is a pure function of decoded utterances (``{"id", "reference",
"hypothesis"}`` records, as :func:`lors.evaluation.evaluate` and the experiment's evaluation
JSONs hold them).

Sufficient statistics, one row per utterance:

* asr (:func:`asr_statistics`): ``[word edits, reference words]`` from jiwer's alignment of
  the texts after the same normaliser as :func:`lors.evaluation.metrics.wer` (edits = S + D
  + I, reference words = S + D + hits). Corpus WER = sum of edits / sum of reference words.
* st (:func:`st_statistics`): sacrebleu's per-segment BLEU statistics ``[hypothesis length,
  reference length, matches 1..4, totals 1..4]`` with the defaults of
  :func:`lors.evaluation.metrics.bleu` (13a, exponential smoothing, case-sensitive, raw
  text). Corpus BLEU = sacrebleu's score of the summed statistics.

So :func:`corpus_score` of the summed rows is exactly the corpus score the evaluation
reports, and a bootstrap replicate is the corpus score of a resampled sum.

Bootstrap (:func:`bootstrap_normalised`, :func:`compare_models`): per (language, task) pair,
each replicate draws that pair's ``n`` test utterances with replacement (uniformly, ``n``
draws); the *same* draw is used for every model and for the expert (joint resampling), so
differences between models are paired. Pairs are drawn in order from one
``numpy.random.default_rng(seed)``. Intervals are percentile intervals: the ``(1 - c) / 2``
and ``(1 + c) / 2`` quantiles (numpy's linear interpolation) of the replicates, ``c`` =
``confidence`` (default 0.90). A paired difference is "significant" when its interval
excludes 0; its two-sided p-value is ``min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1))``
over the ``B`` replicate differences ``d``. A replicate whose value is undefined (NaN: an asr
resample that drew only empty references, so both WERs are infinite) is left out of the
quantiles and of ``B``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jiwer
import numpy as np
from sacrebleu.metrics import BLEU

from ..evaluation.metrics import _check_pairs, _normalized
from .normalised import (MAX_EXPERT_WER, MIN_EXPERT_BLEU, expert_floor_reason, score_ratio)

REPLICATES = 1000
CONFIDENCE = 0.90
SEED = 0

Pair = tuple[str, str]


# ------------------------------------------------------------------ sufficient statistics


def asr_statistics(refs: Sequence[str], hyps: Sequence[str],
                   language: str | None = None) -> np.ndarray:
    """Per-utterance word edits and reference words, shape ``(n, 2)``, int64.

    The texts are normalised exactly as :func:`lors.evaluation.metrics.wer` does (for
    ``language``, or whitespace only when None) and aligned by ``jiwer.process_words``;
    row ``i`` is ``[S_i + D_i + I_i, S_i + D_i + H_i]``. An empty reference has 0 words and
    its hypothesis's words as insertions. Raises ValueError as :func:`wer` does for
    mismatched or empty input.
    """
    _check_pairs(refs, hyps)
    output = jiwer.process_words(_normalized(refs, language), _normalized(hyps, language))
    rows = []
    for chunks in output.alignments:
        edits = words = 0
        for chunk in chunks:
            ref_span = chunk.ref_end_idx - chunk.ref_start_idx
            if chunk.type == "insert":
                edits += chunk.hyp_end_idx - chunk.hyp_start_idx
            elif chunk.type == "equal":
                words += ref_span
            else:  # substitute or delete: one edit per reference word
                edits += ref_span
                words += ref_span
        rows.append((edits, words))
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def _bleu_metric() -> BLEU:
    """sacrebleu BLEU with the defaults :func:`lors.evaluation.metrics.bleu` uses."""
    return BLEU()


def st_statistics(refs: Sequence[str], hyps: Sequence[str]) -> np.ndarray:
    """Per-utterance sacrebleu BLEU statistics, shape ``(n, 10)``, int64.

    Row ``i``: ``[hyp_len, ref_len, matches_1..4, totals_1..4]`` of hypothesis ``i``
    against its one reference, from ``BLEU()._extract_corpus_statistics`` (13a tokeniser on
    the raw text, as :func:`lors.evaluation.metrics.bleu`).
    """
    _check_pairs(refs, hyps)
    stats = _bleu_metric()._extract_corpus_statistics(list(hyps), [list(refs)])
    return np.asarray(stats, dtype=np.int64).reshape(len(refs), -1)


def utterance_statistics(task: str, refs: Sequence[str], hyps: Sequence[str],
                         language: str | None = None) -> np.ndarray:
    """:func:`asr_statistics` (normalised for ``language``) or :func:`st_statistics`."""
    if task == "asr":
        return asr_statistics(refs, hyps, language)
    if task == "st":
        return st_statistics(refs, hyps)
    raise ValueError(f"task must be 'asr' or 'st', not {task!r}")


def corpus_score(task: str, totals) -> float:
    """The corpus score of summed statistics (one row of the shape above).

    asr: WER as a fraction, ``edits / reference words`` (0.0 when both are 0, ``inf`` when
    only the reference words are: a resample of empty references); st: sacrebleu's BLEU
    (0-100) of the summed statistics.
    """
    totals = [int(value) for value in totals]
    if task == "asr":
        edits, words = totals
        if words == 0:
            return 0.0 if edits == 0 else math.inf
        return edits / words
    if task == "st":
        return float(_bleu_metric()._compute_score_from_stats(totals).score)
    raise ValueError(f"task must be 'asr' or 'st', not {task!r}")


def metric_name(task: str) -> str:
    """``"wer"`` for asr, ``"bleu"`` for st."""
    return "wer" if task == "asr" else "bleu"


# ------------------------------------------------------------------ bootstrap pieces


def resample_counts(n: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` utterances is drawn, shape ``(replicates, n)``.

    Row ``b`` holds the counts of ``n`` uniform draws with replacement
    (``rng.integers(0, n, (replicates, n))``); every row sums to ``n``.
    """
    if n < 1 or replicates < 1:
        raise ValueError("the bootstrap needs at least one utterance and one replicate")
    draws = rng.integers(0, n, size=(replicates, n))
    flat = draws + (np.arange(replicates) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=replicates * n).reshape(replicates, n)


def replicate_scores(task: str, stats: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The corpus score of every replicate: :func:`corpus_score` of ``counts @ stats``."""
    summed = counts @ stats
    unique, inverse = np.unique(summed, axis=0, return_inverse=True)
    scores = np.array([corpus_score(task, row) for row in unique], dtype=float)
    return scores[np.asarray(inverse).reshape(-1)]


def _defined(values) -> np.ndarray:
    values = np.asarray(values, dtype=float).reshape(-1)
    return values[~np.isnan(values)]


def percentile_interval(values, confidence: float = CONFIDENCE) -> list[float | None]:
    """``[lo, hi]``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles
    (numpy's linear interpolation) of the non-NaN ``values``; ``[None, None]`` if none."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    values = _defined(values)
    if values.size == 0:
        return [None, None]
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return [float(lo), float(hi)]


def paired_test(values, reference_values, point: float,
                confidence: float = CONFIDENCE) -> dict:
    """Bootstrap test of ``values - reference_values`` (replicates of the same resamples).

    Returns ``{"difference": point, "interval": [lo, hi], "p_value", "significant"}``:
    ``point`` is the full-sample difference (model - reference), the interval the
    :func:`percentile_interval` of the replicate differences ``d``, ``p_value`` =
    ``min(1, 2 * (min(#{d <= 0}, #{d >= 0}) + 1) / (B + 1))`` and ``significant`` is True
    when the interval excludes 0 (``lo > 0`` or ``hi < 0``). NaN differences are dropped.
    """
    with np.errstate(invalid="ignore"):
        differences = _defined(np.asarray(values, dtype=float)
                               - np.asarray(reference_values, dtype=float))
    lo, hi = percentile_interval(differences, confidence)
    if lo is None:
        return {"difference": float(point), "interval": [None, None], "p_value": None,
                "significant": False}
    below, above = int(np.sum(differences <= 0)), int(np.sum(differences >= 0))
    p_value = min(1.0, 2.0 * (min(below, above) + 1) / (differences.size + 1))
    return {"difference": float(point), "interval": [lo, hi], "p_value": p_value,
            "significant": bool(lo > 0 or hi < 0)}


def pair_label(pair: Pair) -> str:
    """``"de-asr"``."""
    return f"{pair[0]}-{pair[1]}"


def _aligned(records: Sequence[Mapping], ids: list[str], references: dict[str, str],
             pair: Pair, who: str) -> tuple[list[str], list[str]]:
    """References and hypotheses of ``records`` in the order of ``ids``; ValueError unless
    the records cover exactly ``ids`` once each, with the same references."""
    by_id: dict[str, Mapping] = {}
    for record in records:
        if record["id"] in by_id:
            raise ValueError(f"{who}: utterance {record['id']!r} appears twice in pair "
                             f"{pair_label(pair)}")
        by_id[record["id"]] = record
    if set(by_id) != set(ids):
        raise ValueError(f"{who}: the utterances of pair {pair_label(pair)} differ from the "
                         "other models'; a paired bootstrap needs the same test set")
    for key in ids:
        if by_id[key]["reference"] != references[key]:
            raise ValueError(f"{who}: utterance {key!r} of pair {pair_label(pair)} has another "
                             "reference than the other models'")
    return [by_id[key]["reference"] for key in ids], [by_id[key]["hypothesis"] for key in ids]


class _PairSample:
    """One pair's test set, its joint resample counts, and each model's scores on it."""

    def __init__(self, pair: Pair, first: Sequence[Mapping], replicates: int,
                 rng: np.random.Generator) -> None:
        self.pair, self.task = pair, pair[1]
        if not first:
            raise ValueError(f"pair {pair_label(pair)} has no test utterances")
        self.ids = [record["id"] for record in first]
        self.references = {record["id"]: record["reference"] for record in first}
        self.counts = resample_counts(len(self.ids), replicates, rng)

    @property
    def n(self) -> int:
        return len(self.ids)

    def scores(self, records: Sequence[Mapping], who: str) -> tuple[float, np.ndarray]:
        """(full-sample corpus score, replicate scores) of one model's records."""
        refs, hyps = _aligned(records, self.ids, self.references, self.pair, who)
        stats = utterance_statistics(self.task, refs, hyps, self.pair[0])
        return (corpus_score(self.task, stats.sum(axis=0)),
                replicate_scores(self.task, stats, self.counts))


def _check_settings(replicates: int, confidence: float) -> None:
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, not {replicates}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")


# ------------------------------------------------------------------ normalised performance


def bootstrap_normalised(models: Mapping[str, Mapping[Pair, Sequence[Mapping]]],
                         experts: Mapping[Pair, Sequence[Mapping]], *,
                         references: Sequence[str] = ("lors", "mtl"),
                         replicates: int = REPLICATES, confidence: float = CONFIDENCE,
                         seed: int = SEED, min_expert_bleu: float | None = MIN_EXPERT_BLEU,
                         max_expert_wer: float | None = MAX_EXPERT_WER) -> dict[str, dict]:
    """Normalised performance of every model with bootstrap intervals and paired tests.

    ``experts[(language, task)]`` are the utterance records of that pair's expert, in the
    order that defines the pairs and the test set; ``models[name][(language, task)]`` are
    each model's records for every one of those pairs (same ids and references; any order).
    A pair is excluded when its expert's full-test-set score fails
    :func:`~.normalised.expert_floor_reason` (fixed for all replicates); when every pair is
    excluded, the means are over all pairs and ``all_pairs_excluded`` is True.

    Per replicate (joint resample, see the module docstring) and model, the pair ratio is
    :func:`~.normalised.score_ratio` of the model's and the expert's resampled corpus
    scores; ``normalised`` = 100 x arithmetic mean and ``normalised_geometric`` = 100 x
    geometric mean of the included pairs' ratios. The point values use the full test set
    (they equal :func:`~.normalised.normalised_performance` of the reported scores).

    Returns ``{name: {"normalised", "normalised_interval": [lo, hi], "normalised_geometric",
    "normalised_geometric_interval", "paired": {ref: paired_test(...)}, "test_per_pair":
    {"de-asr": n}, "excluded_pairs": [{"language", "task", "reason"}], "all_pairs_excluded",
    "bootstrap": {"replicates", "confidence", "seed"}}}``. ``paired`` compares the model's
    arithmetic normalised performance with each name of ``references`` that is among
    ``models`` and is not the model itself (difference = model - reference, in points).
    Raises ValueError when a model lacks a pair or its test set differs from the expert's.
    """
    _check_settings(replicates, confidence)
    if not experts:
        raise ValueError("no pairs to normalise")
    rng = np.random.default_rng(seed)
    samples = {pair: _PairSample(pair, records, replicates, rng)
               for pair, records in experts.items()}
    expert_scores = {pair: sample.scores(experts[pair], f"expert {pair_label(pair)}")
                     for pair, sample in samples.items()}
    excluded = []
    for pair, (score, _) in expert_scores.items():
        reason = expert_floor_reason(pair[1], score, min_expert_bleu=min_expert_bleu,
                                     max_expert_wer=max_expert_wer)
        if reason is not None:
            excluded.append({"language": pair[0], "task": pair[1], "reason": reason})
    skipped = {(entry["language"], entry["task"]) for entry in excluded}
    included = [pair for pair in samples if pair not in skipped] or list(samples)

    means: dict[str, dict] = {}
    for name, by_pair in models.items():
        missing = [pair_label(pair) for pair in samples if pair not in by_pair]
        if missing:
            raise ValueError(f"model {name!r} has no results for pair(s) {', '.join(missing)}")
        points, draws = [], []
        for pair in included:
            score, replicate = samples[pair].scores(by_pair[pair], f"model {name!r}")
            expert_score, expert_replicate = expert_scores[pair]
            points.append(float(score_ratio(pair[1], score, expert_score)))
            with np.errstate(divide="ignore", invalid="ignore"):  # inf/inf -> NaN, dropped
                draws.append(score_ratio(pair[1], replicate, expert_replicate))
        ratios = np.vstack(draws)  # (pairs, replicates)
        with np.errstate(divide="ignore", invalid="ignore"):
            means[name] = {
                "arithmetic": (100.0 * sum(points) / len(points), 100.0 * ratios.mean(axis=0)),
                "geometric": (100.0 * math.exp(sum(math.log(r) for r in points) / len(points)),
                              100.0 * np.exp(np.log(ratios).mean(axis=0)))}

    settings = {"replicates": replicates, "confidence": confidence, "seed": seed}
    out = {}
    for name, mean in means.items():
        point, draws = mean["arithmetic"]
        geometric, geometric_draws = mean["geometric"]
        paired = {ref: paired_test(draws, means[ref]["arithmetic"][1],
                                   point - means[ref]["arithmetic"][0], confidence)
                  for ref in references if ref in means and ref != name}
        out[name] = {"normalised": point,
                     "normalised_interval": percentile_interval(draws, confidence),
                     "normalised_geometric": geometric,
                     "normalised_geometric_interval": percentile_interval(geometric_draws,
                                                                          confidence),
                     "paired": paired,
                     "test_per_pair": {pair_label(p): s.n for p, s in samples.items()},
                     "excluded_pairs": [dict(entry) for entry in excluded],
                     "all_pairs_excluded": len(excluded) == len(samples),
                     "bootstrap": dict(settings)}
    return out


# ------------------------------------------------------------------ per-pair comparison


def compare_models(models: Mapping[str, Mapping[Pair, Sequence[Mapping]]], *,
                   replicates: int = REPLICATES, confidence: float = CONFIDENCE,
                   seed: int = SEED) -> dict:
    """Per-pair WER/BLEU of several models with intervals, and paired differences to the first.

    ``models[name][(language, task)]`` are utterance records; the first model is the
    reference and its pairs (in its order) and test sets are the ones compared; every other
    model must have the same pairs and utterances. Resampling is joint across models, per
    pair (module docstring).

    Returns ``{"reference", "replicates", "confidence", "seed", "pairs": [{"language",
    "task", "n", "metric": "wer" | "bleu", "models": [{"model", "score", "interval",
    "difference", "difference_interval", "p_value", "significant"}]}]}``: ``score`` is the
    corpus WER (fraction) or BLEU of the full test set, ``interval`` its percentile
    interval, and for every model but the reference the :func:`paired_test` of model -
    reference (so a negative WER difference or a positive BLEU difference is better); the
    reference's difference fields are None.
    """
    _check_settings(replicates, confidence)
    names = list(models)
    if not names:
        raise ValueError("no models to compare")
    reference = names[0]
    rng = np.random.default_rng(seed)
    pairs = []
    for pair, records in models[reference].items():
        sample = _PairSample(pair, records, replicates, rng)
        scored = {}
        for name in names:
            if pair not in models[name]:
                raise ValueError(f"model {name!r} has no results for pair {pair_label(pair)}")
            scored[name] = sample.scores(models[name][pair], f"model {name!r}")
        ref_point, ref_draws = scored[reference]
        rows = []
        for name in names:
            point, draws = scored[name]
            row = {"model": name, "score": point,
                   "interval": percentile_interval(draws, confidence),
                   "difference": None, "difference_interval": None, "p_value": None,
                   "significant": None}
            if name != reference:
                test = paired_test(draws, ref_draws, point - ref_point, confidence)
                row.update(difference=test["difference"], difference_interval=test["interval"],
                           p_value=test["p_value"], significant=test["significant"])
            rows.append(row)
        pairs.append({"language": pair[0], "task": pair[1], "n": sample.n,
                      "metric": metric_name(pair[1]), "models": rows})
    return {"reference": reference, "replicates": replicates, "confidence": confidence,
            "seed": seed, "pairs": pairs}
