"""Normalised performance: a method's test scores relative to each pair's own expert, in percent.

Per (language, task) pair the ratio is WER_expert / WER_method (asr) or BLEU_method /
BLEU_expert (st), both scores floored at :data:`WER_FLOOR` / :data:`BLEU_FLOOR` so nothing
divides by zero. A pair whose *expert* is too weak for a ratio to mean anything (expert BLEU
below ``min_expert_bleu``, default :data:`MIN_EXPERT_BLEU` = 5, or expert WER above
``max_expert_wer``, default :data:`MAX_EXPERT_WER` = 1.0 = 100 %) is flagged and left out of
the means; the arithmetic mean (``percent``) and the geometric mean (``geometric``) are taken
over the remaining pairs. Bootstrap intervals are in :mod:`.intervals`.
"""

from __future__ import annotations

import math

import numpy as np

WER_FLOOR = 1e-3  # 0.1 % WER: below this every WER counts as 0.1 %
BLEU_FLOOR = 0.1  # BLEU points: below this every BLEU counts as 0.1
MIN_EXPERT_BLEU = 5.0  # an st pair whose expert scores under 5 BLEU is excluded from the mean
MAX_EXPERT_WER = 1.0  # an asr pair whose expert's WER is over 100 % is excluded from the mean


def _pair_name(result: dict) -> str:
    return f"({result.get('language')!r}, {result.get('task')!r})"


def _score(result: dict, key: str, who: str) -> float:
    """The ``key`` score of one result; a ValueError naming the pair when it is missing."""
    value = result.get(key)
    if value is None:
        raise ValueError(f"{who} result for pair {_pair_name(result)} has no {key!r} score")
    return float(value)


def score_ratio(task: str, method_score, expert_score):
    """The ratio of one pair from bare scores; floats or numpy arrays (elementwise).

    asr: ``max(expert_wer, WER_FLOOR) / max(method_wer, WER_FLOOR)`` (WER as fractions);
    st: ``max(method_bleu, BLEU_FLOOR) / max(expert_bleu, BLEU_FLOOR)`` (BLEU 0-100).
    Raises ValueError for another task.
    """
    if task == "asr":
        return np.maximum(expert_score, WER_FLOOR) / np.maximum(method_score, WER_FLOOR)
    if task == "st":
        return np.maximum(method_score, BLEU_FLOOR) / np.maximum(expert_score, BLEU_FLOOR)
    raise ValueError(f"task must be 'asr' or 'st', not {task!r}")


def pair_ratio(method: dict, expert: dict) -> float:
    """The method-to-expert ratio of one (language, task) pair (1.0 = as good as the expert).

    ASR: ``max(WER_expert, WER_FLOOR) / max(WER_method, WER_FLOOR)``.
    ST:  ``max(BLEU_method, BLEU_FLOOR) / max(BLEU_expert, BLEU_FLOOR)``.
    Both scores are floored (not only the denominator) so a perfect method never divides by
    zero and two equal scores, zeros included, always give exactly 1.0.
    Raises ValueError for an unknown task or a missing score.
    """
    task = method.get("task")
    if task not in ("asr", "st"):
        raise ValueError(f"pair {_pair_name(method)}: task must be 'asr' or 'st'")
    key = "wer" if task == "asr" else "bleu"
    return float(score_ratio(task, _score(method, key, "method"), _score(expert, key, "expert")))


def expert_floor_reason(task: str, expert_score: float, *,
                        min_expert_bleu: float | None = MIN_EXPERT_BLEU,
                        max_expert_wer: float | None = MAX_EXPERT_WER) -> str | None:
    """Why a pair with this expert score is excluded from the normalised mean, or None.

    asr: excluded when ``expert_wer > max_expert_wer`` (a fraction; 1.0 = 100 %); st:
    excluded when ``expert_bleu < min_expert_bleu``. A floor of None never excludes.
    """
    if task == "asr" and max_expert_wer is not None and expert_score > max_expert_wer:
        return f"expert WER {100 * expert_score:.1f} % > {100 * max_expert_wer:g} %"
    if task == "st" and min_expert_bleu is not None and expert_score < min_expert_bleu:
        return f"expert BLEU {expert_score:.1f} < {min_expert_bleu:g}"
    return None


def geometric_mean(ratios) -> float:
    """``exp(mean(log(ratio)))`` of positive ratios (floored ratios always are)."""
    ratios = [float(r) for r in ratios]
    if not ratios:
        raise ValueError("no ratios to average")
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def normalised_performance(method_results: list[dict],
                           expert_results: dict[tuple[str, str], dict], *,
                           min_expert_bleu: float | None = MIN_EXPERT_BLEU,
                           max_expert_wer: float | None = MAX_EXPERT_WER) -> dict:
    """Mean over the method's pairs of :func:`pair_ratio`, in percent, weak-expert pairs left out.

    ``method_results`` holds one result per (language, task) pair (keys ``language``,
    ``task``, and ``wer`` as a fraction for ASR or ``bleu`` on the 0-100 scale for ST);
    ``expert_results[(language, task)]`` is that pair's own expert result. 100 % means as good
    as every expert at once. A pair whose expert fails :func:`expert_floor_reason` (expert
    BLEU < ``min_expert_bleu``, expert WER > ``max_expert_wer``; None disables a floor) still
    gets its ratio but is excluded from both means.

    Returns ``{"percent", "geometric", "pairs", "excluded", "all_excluded"}``: ``percent`` is
    100 x the arithmetic mean and ``geometric`` 100 x the geometric mean of the included
    pairs' ratios; ``pairs`` lists every pair in input order as ``{"language", "task",
    "ratio", "excluded", "reason"}`` (ratio as a fraction, reason None when included);
    ``excluded`` lists ``{"language", "task", "reason"}`` of the excluded pairs. When every
    pair is excluded, ``all_excluded`` is True and both means are over all pairs (so callers
    such as the dev search still get a number; reports must flag it as not meaningful).
    Raises ValueError when there are no results, a pair repeats, a pair has no expert result,
    or a needed score is missing.
    """
    if not method_results:
        raise ValueError("no method results to normalise")
    pairs, seen = [], set()
    for result in method_results:
        key = (result.get("language"), result.get("task"))
        if key in seen:
            raise ValueError(f"pair {_pair_name(result)} appears more than once")
        seen.add(key)
        if key not in expert_results:
            raise ValueError(f"no expert result for pair {_pair_name(result)}")
        expert = expert_results[key]
        ratio = pair_ratio(result, expert)
        score_key = "wer" if key[1] == "asr" else "bleu"
        reason = expert_floor_reason(key[1], _score(expert, score_key, "expert"),
                                     min_expert_bleu=min_expert_bleu,
                                     max_expert_wer=max_expert_wer)
        pairs.append({"language": key[0], "task": key[1], "ratio": ratio,
                      "excluded": reason is not None, "reason": reason})
    included = [pair["ratio"] for pair in pairs if not pair["excluded"]]
    all_excluded = not included
    if all_excluded:
        included = [pair["ratio"] for pair in pairs]
    return {"percent": 100.0 * sum(included) / len(included),
            "geometric": 100.0 * geometric_mean(included), "pairs": pairs,
            "excluded": [{"language": p["language"], "task": p["task"], "reason": p["reason"]}
                         for p in pairs if p["excluded"]],
            "all_excluded": all_excluded}
