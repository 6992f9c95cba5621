"""Tables and text of the experiment report, built from the experiment dict (no file access).

Display conventions: WER in percent with 1 decimal, BLEU 1 decimal, normalised % 1 decimal,
seconds 1 decimal, ``-`` for anything missing.
"""

from __future__ import annotations

from .report_document import Table


def fmt(value, digits: int = 1) -> str:
    """``value`` with ``digits`` decimals, or ``-`` when it is None."""
    return "-" if value is None else f"{float(value):.{digits}f}"


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
    """One row per model: per-pair WER%/BLEU and normalised %; the best of each column bold."""
    pairs = setting_pairs(setting)
    models = setting.get("models", [])
    header = ["model"] + [pair_column(lang, task) for lang, task in pairs] + ["normalised %"]
    columns = [[pair_score(model, lang, task) for model in models] for lang, task in pairs]
    columns.append([model.get("normalised") for model in models])
    lower = [task == "asr" for _, task in pairs] + [False]
    rows = [[model["name"]] + [fmt(column[r]) for column in columns]
            for r, model in enumerate(models)]
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
    rows = [[row.get("name", "-"), fmt(row.get("normalised")), fmt(row.get("cost_s"))]
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
    return [name for name in names
            if len({repr(point["params"].get(name)) for point in points}) > 1]


def best_sweep_line(method: str, points: list[dict]) -> str:
    """``"lors: 12 dev points (+1 past a lambda edge); best 95.3 % at lambda=0.2, rank=7"``,
    with a flag for every parameter whose chosen value is still the edge of its grid."""
    scored = [point for point in points if point.get("dev_score") is not None]
    if not scored:
        return f"{method}: {len(points)} dev points, none scored"
    best = max(scored, key=lambda point: point["dev_score"])
    widened = sum(1 for point in points if point.get("widened"))
    line = (f"{method}: {len(points) - widened} dev points"
            + (f" (+{widened} past a lambda edge)" if widened else "")
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
