"""Tables and text of the experiment report, built from the experiment dict (no file access).

Display conventions: WER in percent with 1 decimal, BLEU 1 decimal, normalised % 1 decimal,
seconds 1 decimal, ``-`` for anything missing. Normalised scores with a bootstrap interval
read ``value [lo, hi]`` (see :mod:`.intervals`); a ``†`` marks a mean over pairs whose
experts are all below the floor (not meaningful).
"""

from __future__ import annotations

from .report_document import Table


def fmt(value, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or ``-`` when it is None."""
    return "-" if value is None else f"{float(value):.{digits}f}"


def with_interval(value, interval, digits: int = 1) -> str:
    """``"86.0 [80.1, 90.2]"``; ``"86.0"`` without an interval; ``-`` without a value."""
    if value is None:
        return "-"
    if not interval or interval[0] is None or interval[1] is None:
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(interval[0], digits)}, {fmt(interval[1], digits)}]"


def _normalised_cell(model: dict, key: str) -> str:
    text = with_interval(model.get(key), model.get(f"{key}_interval"))
    return text + " †" if model.get("all_pairs_excluded") and text != "-" else text


def pair_column(language: str, task: str) -> str:
    """Column title of one pair's score: ``"de asr WER%"`` or ``"de st BLEU"``."""
    return f"{language} {task} WER%" if task == "asr" else f"{language} {task} BLEU"


def setting_pairs(setting: dict) -> list[tuple[str, str]]:
    """The setting's (language, task) pairs: its ``pairs`` list, else those in its results."""
    if setting.get("pairs"):
        return [(language, task) for language, task in setting["pairs"]]
    seen = ((row["language"], row["task"]) for model in setting.get("models", [])
            for row in model.get("results", []))
    return list(dict.fromkeys(seen))


def pair_score(model: dict, language: str, task: str) -> float | None:
    """The model's displayed test score of a pair: WER in percent (ASR) or BLEU (ST)."""
    for row in model.get("results", []):
        if row.get("language") == language and row.get("task") == task:
            key = "wer" if task == "asr" else "bleu"
            value = row.get(key)
            return None if value is None else float(value) * (100.0 if key == "wer" else 1.0)
    return None


def _best_rows(values: list[float | None], lower_is_better: bool) -> set[int]:
    """Rows holding the best value at display precision; empty when fewer than two distinct values."""
    shown = {r: round(v, 1) for r, v in enumerate(values) if v is not None}
    if len(set(shown.values())) < 2:
        return set()
    best = min(shown.values()) if lower_is_better else max(shown.values())
    return {r for r, v in shown.items() if v == best}


def score_table(setting: dict) -> Table:
    """One row per model: per-pair WER%/BLEU and normalised % (arithmetic mean, and the
    geometric mean when the models have one), each ``value [lo, hi]`` when a bootstrap
    interval is stored; the best of each column bold (by value)."""
    pairs = setting_pairs(setting)
    models = setting.get("models", [])
    keys = ["normalised"]
    if any(model.get("normalised_geometric") is not None for model in models):
        keys.append("normalised_geometric")
    header = (["model"] + [pair_column(lang, task) for lang, task in pairs] + ["normalised %"]
              + (["geometric %"] if len(keys) > 1 else []))
    columns = [[pair_score(model, lang, task) for model in models] for lang, task in pairs]
    texts = [[fmt(value) for value in column] for column in columns]
    for key in keys:
        columns.append([model.get(key) for model in models])
        texts.append([_normalised_cell(model, key) for model in models])
    lower = [task == "asr" for _, task in pairs] + [False] * len(keys)
    rows = [[model["name"]] + [text[r] for text in texts] for r, model in enumerate(models)]
    bold = {(r, c + 1) for c, column in enumerate(columns)
            for r in _best_rows(column, lower[c])}
    return Table(header, rows, bold)


def score_count(setting: dict) -> int:
    """How many (model, pair) scores the setting has: the completeness used to pick a summary."""
    pairs = setting_pairs(setting)
    return sum(pair_score(model, lang, task) is not None
               for model in setting.get("models", []) for lang, task in pairs)


def summary_setting(experiment: dict) -> dict | None:
    """The setting with the most (model, pair) scores; the first one on ties; None if none."""
    settings = experiment.get("settings") or []
    if not settings:
        return None
    return max(settings, key=score_count)  # max keeps the first of equal keys


def _bootstrap_settings(setting: dict) -> dict | None:
    """The first model's stored bootstrap facts (they are the same for every model)."""
    for model in setting.get("models", []):
        if model.get("bootstrap"):
            return model
    return None


def _level(model: dict) -> str:
    return f"{100 * model['bootstrap'].get('confidence', 0.9):g} %"


def bootstrap_note(setting: dict) -> str | None:
    """How the intervals were made and the test-set size per pair; None without intervals."""
    model = _bootstrap_settings(setting)
    if model is None:
        return None
    boot = model["bootstrap"]
    sizes = ", ".join(f"{pair} {n}" for pair, n in (model.get("test_per_pair") or {}).items())
    return (f"[lo, hi] = {_level(model)} percentile bootstrap interval over the test "
            f"utterances: {boot.get('replicates')} replicates (seed {boot.get('seed')}), the "
            "same resampled utterances for every model and expert of a pair. Test utterances "
            f"per pair: {sizes or '-'}. Geometric % = 100 x the geometric mean of the pair "
            "ratios.")


def excluded_note(setting: dict) -> str | None:
    """Which pairs are left out of the normalised means and why; None when none is."""
    model = _bootstrap_settings(setting)
    if model is None or not model.get("excluded_pairs"):
        return None
    listed = "; ".join(f"{e['language']}-{e['task']} ({e['reason']})"
                       for e in model["excluded_pairs"])
    if model.get("all_pairs_excluded"):
        return (f"Every pair's expert is below the floor ({listed}), so the normalised "
                "scores (†) are means over all pairs and are not meaningful.")
    return f"Excluded from the normalised means because their expert is below the floor: {listed}."


def _paired_entries(setting: dict) -> list[tuple[dict, str, dict]]:
    """(model, reference name, test) of every stored paired test; each unordered couple once."""
    seen, entries = set(), []
    for model in setting.get("models", []):
        for reference, test in (model.get("paired") or {}).items():
            couple = frozenset((model["name"], reference))
            if couple not in seen:
                seen.add(couple)
                entries.append((model, reference, test))
    return entries


def _signed(value, digits: int = 1) -> str:
    return "-" if value is None else f"{float(value):+.{digits}f}"


def paired_table(setting: dict) -> Table | None:
    """Paired bootstrap tests of normalised % against lors and mtl; None when none is stored.

    One row per (model, reference): the difference model - reference in points with its
    interval, the two-sided bootstrap p-value and whether the interval excludes 0."""
    entries = _paired_entries(setting)
    if not entries:
        return None
    level = _level(entries[0][0])
    rows = []
    for model, reference, test in entries:
        interval = test.get("interval") or [None, None]
        cell = _signed(test.get("difference"))
        if interval[0] is not None:
            cell += f" [{_signed(interval[0])}, {_signed(interval[1])}]"
        rows.append([model["name"], reference, cell,
                     "-" if test.get("p_value") is None else f"{test['p_value']:.3f}",
                     "yes" if test.get("significant") else "no"])
    bold = {(r, 4) for r, row in enumerate(rows) if row[4] == "yes"}
    return Table(["model", "vs", f"difference, points [{level}]", "p", "significant"], rows,
                 bold, left_columns=2)


def significance_lines(setting: dict) -> list[str]:
    """One line per significant paired difference, or one line saying there is none."""
    entries = _paired_entries(setting)
    if not entries:
        return []
    level = _level(entries[0][0])
    lines = [f"{model['name']} vs {reference}: {_signed(test['difference'])} points "
             f"[{_signed(test['interval'][0])}, {_signed(test['interval'][1])}], "
             f"p = {test['p_value']:.3f}"
             for model, reference, test in entries if test.get("significant")]
    return lines or [f"no difference in normalised % is significant ({level} intervals "
                     "all contain 0)"]


def cost_table(setting: dict) -> Table | None:
    """Seconds spent training, merging and evaluating each model, and the device; None if no costs."""
    models = [model for model in setting.get("models", []) if model.get("cost")]
    if not models:
        return None
    rows = [[model["name"], str(model["cost"].get("device") or "-"),
             fmt(model["cost"].get("train_s")), fmt(model["cost"].get("merge_s")),
             fmt(model["cost"].get("eval_s"))]
            for model in models]
    return Table(["model", "device", "train s", "merge s", "eval s"], rows, left_columns=2)


def params_text(params: dict) -> str:
    """``"lambda=0.2, rank=7"``: hyper-parameters in their given order."""
    return ", ".join(f"{name}={value}" for name, value in params.items())


def chosen_params(setting: dict) -> list[str]:
    """One line per model with chosen hyper-parameters: ``"lors: lambda=0.2, rank=7"``."""
    return [f"{model['name']}: {params_text(model['params'])}"
            for model in setting.get("models", []) if model.get("params")]


def size_value(value) -> str:
    """A run-size value as text: lists joined by commas, dicts as ``k=v`` pairs."""
    if isinstance(value, (list, tuple)):
        return ", ".join(size_value(item) for item in value)
    if isinstance(value, dict):
        return params_text(value)
    return str(value)


def size_table(size: dict) -> Table:
    """The run size as a key/value table."""
    return Table(["what", "value"], [[str(key), size_value(value)] for key, value in size.items()],
                 left_columns=2)


def extensibility_table(extensibility: dict) -> Table:
    """Ways to add a language: normalised % after the change and seconds it cost."""
    rows = [[row.get("name", "-"), with_interval(row.get("normalised"),
                                                 row.get("normalised_interval")),
             fmt(row.get("cost_s"))]
            for row in extensibility.get("rows", [])]
    return Table(["approach", "normalised %", "cost s"], rows)


def sweeps_by_method(sweeps: list[dict], setting: str) -> dict[str, list[dict]]:
    """The setting's sweep points grouped by method, methods in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for point in sweeps:
        if point.get("setting") == setting:
            groups.setdefault(point.get("method", "?"), []).append(point)
    return groups


def swept_params(points: list[dict]) -> list[str]:
    """Parameters that take more than one value across ``points``, in first-seen order."""
    names = dict.fromkeys(name for point in points for name in point.get("params", {}))
    return [name for name in names  # scalar axes only (not per-block lambdas)
            if not any(isinstance(point["params"].get(name), dict) for point in points)
            and len({repr(point["params"].get(name)) for point in points}) > 1]


def best_sweep_line(method: str, points: list[dict]) -> str:
    """``"lors: 12 dev points (+1 past a lambda edge); best 95.3 % at lambda=0.2, rank=7"``,
    with a flag for every parameter whose chosen value is still the edge of its grid."""
    scored = [point for point in points if point.get("dev_score") is not None]
    if not scored:
        return f"{method}: {len(points)} dev points, none scored"
    best = max(scored, key=lambda point: point["dev_score"])
    widened = sum(1 for point in points if point.get("widened"))
    blocks = sum(1 for point in points if point.get("blocks"))
    line = (f"{method}: {len(points) - widened - blocks} dev points"
            + (f" (+{widened} past a lambda edge)" if widened else "")
            + (f" (+{blocks} with per-block lambdas)" if blocks else "")
            + f"; best {fmt(best['dev_score'])} % at "
            + (params_text(best.get("params", {})) or "defaults"))
    edges = on_grid_edge(best.get("params", {}), points)
    if edges:
        line += f". On the edge of its grid: {', '.join(edges)} (widen the grid)"
    return line


def on_grid_edge(chosen: dict, points: list[dict]) -> list[str]:
    """Parameters whose chosen value is the smallest or largest of 3 or more values tried
    (or of 2, for lambda, whose grid is widened past an edge)."""
    edges = []
    for name in swept_params(points):
        values = {point["params"][name] for point in points if name in point["params"]}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            continue  # a choice (scope, svd), not a range
        values = sorted(values)
        if len(values) >= (2 if name == "lambda" else 3) and chosen.get(name) in (values[0],
                                                                                   values[-1]):
            edges.append(f"{name}={chosen[name]}")
    return edges
