"""Evaluate a Whisper model on a manifest: decode every (language, task), score, time.

ASR is scored with WER and CER after Whisper's normalisation (fractions: 0.1 = 10 %), ST
with BLEU and chrF on the raw text (sacrebleu's 0-100 scale); see :mod:`.metrics`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from ..base import resolve_model_reference
from ..data.manifest import Utterance, read_manifest
from ..errors import LorsError
from ..fsutil import atomic_file, check_output_free
from ..names import name_list
from .decode import DEFAULT_MAX_NEW_TOKENS, TASKS, Decoder, check_references, reference
from .metrics import bleu, cer, chrf, wer

TARGET_LANGUAGE = "en"  # st translates into English, so English audio has no st pair


def _load(manifest: str | Path | Sequence[Utterance], split: str | None) -> tuple[list[Utterance], str]:
    """The utterances to evaluate (of ``split`` if given) and a name for messages."""
    if isinstance(manifest, (str, Path)):
        utterances, source = read_manifest(manifest), f"manifest {manifest}"
    else:
        utterances, source = list(manifest), "the given utterances"
    if split is not None:
        utterances = [u for u in utterances if u.split == split]
        if not utterances:
            raise LorsError(f"{source} has no utterances in split {split!r}")
    if not utterances:
        raise LorsError(f"{source} holds no utterances")
    return utterances, source


def _pairs(utterances: list[Utterance], languages, tasks, source: str) -> list[tuple[str, str]]:
    """The (language, task) pairs to evaluate, languages in manifest order unless given."""
    present = list(dict.fromkeys(u.language for u in utterances))
    chosen = present if languages is None else name_list(languages, "languages")
    missing = [lang for lang in chosen if lang not in present]
    if missing:
        raise LorsError(f"{source} has no utterances in language(s) {', '.join(missing)}; "
                        f"it has {', '.join(present)}")
    tasks = name_list(tasks, "tasks")
    for task in tasks:
        if task not in TASKS:
            raise LorsError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    pairs = [(lang, task) for lang in chosen for task in tasks
             if not (task == "st" and lang == TARGET_LANGUAGE)]
    if not pairs:
        raise LorsError("nothing to evaluate: st translates into English, so English audio "
                        "has no st result; add asr or another language")
    return pairs


def _check_out(out: Path, force: bool) -> None:
    """Refuse ``out`` if it exists (unless ``force``) or could never become a file."""
    if out.is_dir():
        raise LorsError(f"results path {out} is a directory; pass a file path such as "
                        f"{out / 'results.json'}")
    check_output_free(out, force)
    if any(parent.exists() and not parent.is_dir() for parent in out.parents):
        raise LorsError(f"cannot write results to {out}: a parent path is a file; choose "
                        "another path")


def _write_report(report: dict[str, Any], out: Path) -> None:
    """``report`` as indented JSON at ``out``, atomically: a failure leaves no partial file."""
    try:
        with atomic_file(out, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except OSError as exc:
        raise LorsError(f"cannot write results to {out}: {exc}; choose another path") from exc


def score(task: str, language: str, refs: list[str], hyps: list[str]) -> dict[str, float]:
    """asr: ``{"wer", "cer"}`` normalised for ``language``; st: ``{"bleu", "chrf"}`` on raw text."""
    if task == "asr":
        return {"wer": wer(refs, hyps, language), "cer": cer(refs, hyps, language)}
    return {"bleu": bleu(refs, hyps), "chrf": chrf(refs, hyps)}


def evaluate(model: str | Path | None, manifest: str | Path | Sequence[Utterance], *,
             languages: str | Iterable[str] | None = None,
             tasks: str | Iterable[str] = ("asr",), out: str | Path | None = None,
             batch_size: int = 8, num_beams: int = 1,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, window_seconds: float | None = None,
             split: str | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32,
             show_progress: bool = False, force: bool = False) -> dict[str, Any]:
    """Decode and score ``model`` on ``manifest`` for every requested (language, task).

    ``model``: a Whisper directory, or None/"base" for the embedded base. ``manifest``: a
    JSONL path or a list of utterances. ``languages`` defaults to all languages present (in
    manifest order); ``split`` keeps one split only. English is never evaluated for ``st``.
    All input checks (``out`` free, languages present, references for each task, weights
    readable and safe, language and task tokens known to the model, long clips decodable)
    run before any decoding; the ``out`` check runs before anything else. Clips longer than
    30 s are decoded long-form, never cut. Decoding options are those of
    :meth:`Decoder.decode`.

    Returns ``{"model", "manifest", "settings", "results", "utterances"}``: one result per
    pair with ``language, task, n``, the scores of :func:`score`, ``seconds`` (wall-clock
    of audio loading, features and generation, model loading excluded) and
    ``utterances_per_second``; one utterance record per decoded clip and pair with ``id,
    language, task, reference, hypothesis``. With ``out`` the dict is also written there
    as JSON, atomically; an existing ``out`` is refused with OutputExistsError unless
    ``force``, and is replaced only once the new report is complete.
    """
    if out is not None:
        out = Path(out)
        _check_out(out, force)
    utterances, source = _load(manifest, split)
    pairs = _pairs(utterances, languages, tasks, source)
    groups = {pair: [u for u in utterances if u.language == pair[0]] for pair in pairs}
    for (_, task), group in groups.items():
        check_references(group, task, source)
    model_dir = resolve_model_reference(None if model is None else str(model))
    decoder = Decoder(model_dir, device=device, dtype=dtype)
    for (language, task), group in groups.items():
        decoder.check(language, task)
        decoder.check_clips(group)
    settings = {"model_dir": str(model_dir), "split": split, "batch_size": batch_size,
                "num_beams": num_beams, "max_new_tokens": decoder.token_budget(max_new_tokens),
                "long_form_max_new_tokens": decoder.segment_budget(max_new_tokens),
                "window_seconds": window_seconds, "device": str(device),
                "dtype": str(dtype).removeprefix("torch.")}
    results, records = [], []
    for (language, task), group in groups.items():
        start = time.perf_counter()
        hyps = decoder.decode(group, language, task, batch_size=batch_size, num_beams=num_beams,
                              max_new_tokens=max_new_tokens, window_seconds=window_seconds,
                              show_progress=show_progress)
        seconds = time.perf_counter() - start
        refs = [reference(u, task) or "" for u in group]
        results.append({"language": language, "task": task, "n": len(group),
                        **score(task, language, refs, hyps), "seconds": seconds,
                        "utterances_per_second": len(group) / seconds if seconds > 0 else None})
        records += [{"id": u.id, "language": language, "task": task, "reference": r,
                     "hypothesis": h} for u, r, h in zip(group, refs, hyps)]
    report = {"model": "base" if model is None else str(model),
              "manifest": str(manifest) if isinstance(manifest, (str, Path)) else None,
              "settings": settings, "results": results, "utterances": records}
    if out is not None:
        _write_report(report, out)
    return report


_COLUMNS = (("language", "language", "{}"), ("task", "task", "{}"), ("n", "n", "{}"),
            ("WER %", "wer", "{:.1f}"), ("CER %", "cer", "{:.1f}"), ("BLEU", "bleu", "{:.1f}"),
            ("chrF", "chrf", "{:.1f}"), ("utt/s", "utterances_per_second", "{:.2f}"))
_PERCENT = {"wer", "cer"}  # stored as fractions, shown as percentages


def format_table(results: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    """A plain-text table of an :func:`evaluate` report (or of its ``results`` list).

    One row per result; WER and CER are shown in percent, BLEU and chrF as stored, missing
    scores as ``-``. Columns are right-aligned except language and task.
    """
    rows = results["results"] if isinstance(results, dict) else list(results)
    table = [[title for title, _, _ in _COLUMNS]]
    for row in rows:
        cells = []
        for _, key, fmt in _COLUMNS:
            value = row.get(key)
            if value is None:
                cells.append("-")
            else:
                cells.append(fmt.format(value * 100 if key in _PERCENT else value))
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = []
    for line in table:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _unique_names(names: Sequence[str]) -> list[str]:
    """``names`` with repeats numbered: ``["a", "a"]`` -> ``["a", "a (2)"]``."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def compare(models: Sequence[str | Path | None], manifest: str | Path | Sequence[Utterance], *,
            out: str | Path | None = None, force: bool = False, replicates: int = 1000,
            confidence: float = 0.90, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Evaluate several models on the same manifest and compare each with the first.

    Every model is decoded and scored by :func:`evaluate` (``options`` are its keyword
    arguments, ``out`` and ``force`` excepted); then
    :func:`lors.experiment.intervals.compare_models` gives, per (language, task), each
    model's WER/BLEU with a ``confidence`` percentile bootstrap interval and the paired
    difference to the first model (utterances resampled jointly across models, ``replicates``
    times, seeded by ``seed``). Models are named by their ``model`` string (repeats numbered).

    Returns ``{"models": [evaluate report, ...], "comparison": {...}}``. With ``out`` it is
    written there as JSON, atomically; ``out`` (refused if it exists unless ``force``), the
    bootstrap settings and every model reference are checked before anything is decoded.
    """
    from ..experiment.intervals import compare_models

    if len(models) < 2:
        raise LorsError("a comparison needs at least two models; pass the reference first")
    if replicates < 1:
        raise LorsError(f"--replicates must be at least 1, not {replicates}")
    if not 0 < confidence < 1:
        raise LorsError(f"confidence must be between 0 and 1, not {confidence}")
    if out is not None:
        out = Path(out)
        _check_out(out, force)
    for model in models:
        resolve_model_reference(None if model is None else str(model))
    reports = [evaluate(model, manifest, **options) for model in models]
    records: dict[str, dict[tuple[str, str], list[dict]]] = {}
    for name, report in zip(_unique_names([r["model"] for r in reports]), reports):
        by_pair: dict[tuple[str, str], list[dict]] = {}
        for record in report["utterances"]:
            by_pair.setdefault((record["language"], record["task"]), []).append(record)
        records[name] = by_pair
    try:
        comparison = compare_models(records, replicates=replicates, confidence=confidence,
                                    seed=seed)
    except ValueError as exc:
        raise LorsError(f"cannot compare the models: {exc}") from exc
    result = {"models": reports, "comparison": comparison}
    if out is not None:
        _write_report(result, out)
    return result


def _score_text(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}" if metric == "wer" else f"{value:.1f}"


def _interval_text(interval, metric: str) -> str:
    if not interval or interval[0] is None:
        return "-"
    return f"[{_score_text(interval[0], metric)}, {_score_text(interval[1], metric)}]"


def format_comparison(comparison: dict[str, Any]) -> str:
    """A plain-text table of a :func:`compare` ``comparison``: one row per pair and model.

    Columns: language, task, n, model, metric (``WER %`` or ``BLEU``), the score and its
    interval, the difference to the reference (model - reference, WER in percentage
    points) with its interval, the bootstrap p-value and ``yes``/``no`` for significant
    (the interval of the difference excludes 0); ``-`` on the reference's own rows. A
    header line names the reference, the replicates and the confidence level.
    """
    level = f"{100 * comparison['confidence']:g} %"
    header = ["language", "task", "n", "model", "metric", "score", f"{level} CI",
              "diff vs ref", f"diff {level} CI", "p", "significant"]
    table = [header]
    for pair in comparison["pairs"]:
        metric = pair["metric"]
        for row in pair["models"]:
            reference = row["difference"] is None
            table.append([pair["language"], pair["task"], str(pair["n"]), row["model"],
                          "WER %" if metric == "wer" else "BLEU",
                          _score_text(row["score"], metric),
                          _interval_text(row["interval"], metric),
                          "-" if reference else f"{'+' if row['difference'] >= 0 else ''}"
                                                f"{_score_text(row['difference'], metric)}",
                          "-" if reference else _interval_text(row["difference_interval"],
                                                               metric),
                          "-" if reference or row["p_value"] is None
                          else f"{row['p_value']:.3f}",
                          "-" if reference else ("yes" if row["significant"] else "no")])
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [f"reference: {comparison['reference']}; {comparison['replicates']} bootstrap "
             f"replicates of the utterances, resampled jointly across models (seed "
             f"{comparison['seed']}); diff = model - reference (WER: lower is better, BLEU: "
             f"higher is better); significant = the {level} interval of the diff excludes 0"]
    for line in table:
        cells = [cell.ljust(w) if i in (0, 1, 3, 4) else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
