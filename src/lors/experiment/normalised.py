"""Normalised performance: a method's test scores relative to each pair's own expert, in percent."""

from __future__ import annotations

WER_FLOOR = 1e-3  # 0.1 % WER: below this every WER counts as 0.1 %
BLEU_FLOOR = 0.1  # BLEU points: below this every BLEU counts as 0.1


def _pair_name(result: dict) -> str:
    return f"({result.get('language')!r}, {result.get('task')!r})"


def _score(result: dict, key: str, who: str) -> float:
    """The ``key`` score of one result; a ValueError naming the pair when it is missing."""
    value = result.get(key)
    if value is None:
        raise ValueError(f"{who} result for pair {_pair_name(result)} has no {key!r} score")
    return float(value)


def pair_ratio(method: dict, expert: dict) -> float:
    """The method-to-expert ratio of one (language, task) pair (1.0 = as good as the expert).

    ASR: ``max(WER_expert, WER_FLOOR) / max(WER_method, WER_FLOOR)``.
    ST:  ``max(BLEU_method, BLEU_FLOOR) / max(BLEU_expert, BLEU_FLOOR)``.
    Both scores are floored (not only the denominator) so a perfect method never divides by
    zero and two equal scores, zeros included, always give exactly 1.0.
    Raises ValueError for an unknown task or a missing score.
    """
    task = method.get("task")
    if task == "asr":
        expert_wer = max(_score(expert, "wer", "expert"), WER_FLOOR)
        return expert_wer / max(_score(method, "wer", "method"), WER_FLOOR)
    if task == "st":
        method_bleu = max(_score(method, "bleu", "method"), BLEU_FLOOR)
        return method_bleu / max(_score(expert, "bleu", "expert"), BLEU_FLOOR)
    raise ValueError(f"pair {_pair_name(method)}: task must be 'asr' or 'st'")


def normalised_performance(method_results: list[dict],
                           expert_results: dict[tuple[str, str], dict]) -> dict:
    """Mean over the method's pairs of :func:`pair_ratio`, in percent.

    ``method_results`` holds one result per (language, task) pair (keys ``language``,
    ``task``, and ``wer`` as a fraction for ASR or ``bleu`` on the 0-100 scale for ST);
    ``expert_results[(language, task)]`` is that pair's own expert result. 100 % means as good
    as every expert at once. Returns ``{"percent": float, "pairs": [{"language", "task",
    "ratio"}, ...]}`` with pairs in input order and ratios as fractions.
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
        ratio = pair_ratio(result, expert_results[key])
        pairs.append({"language": key[0], "task": key[1], "ratio": ratio})
    percent = 100.0 * sum(pair["ratio"] for pair in pairs) / len(pairs)
    return {"percent": percent, "pairs": pairs}
